"""The Flower ClientApp: one hospital trains one round, or evaluates the global model."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from murmur.models.data import HospitalSplit
from murmur.models.metrics import clinical_metrics
from murmur.models.training import choose_threshold, predict_proba

from murmur_flower.task import build_mlp, hospital, make_trainer

torch.set_num_threads(1)  # as a murmur node does: many clients share two cores

app = ClientApp()


def _split(context: Context) -> HospitalSplit:
    run = context.run_config
    return hospital(
        str(run["dataset"]),
        int(run["num-hospitals"]),
        int(run["seed"]),
        int(context.node_config["partition-id"]),
    )


def _serialized_bytes(record: ArrayRecord) -> int:
    """Bytes of the model as Flower serializes it for the wire (its object tree)."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(record).values())


@app.train()
def train(msg: Message, context: Context) -> Message:
    split = _split(context)
    model = build_mlp(split, int(context.run_config["seed"]))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    server_round = int(msg.content["config"]["server-round"])
    make_trainer(model, split, context.run_config, server_round).train_round()
    arrays = ArrayRecord(model.state_dict())
    metrics = MetricRecord(
        {
            "num-examples": len(split.y_train),
            # FedAvg weighted by this key is a plain mean, like murmur's mean on a complete
            # graph (Metropolis-Hastings weights are all 1/n there).
            "unit-weight": 1.0,
            "message-bytes": _serialized_bytes(arrays),
        }
    )
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """murmur's node evaluation: AUC on the held-out split of this hospital."""
    split = _split(context)
    model = build_mlp(split, int(context.run_config["seed"]))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    train_prob = predict_proba(model, split.x_train)
    threshold = choose_threshold(split.y_train, train_prob)
    metrics = clinical_metrics(
        split.y_test, predict_proba(model, split.x_test), threshold, y_train=split.y_train
    )
    auc = metrics.get("auc")
    record = MetricRecord({"unit-weight": 1.0, "auc": float("nan") if auc is None else float(auc)})
    return Message(RecordDict({"metrics": record}), reply_to=msg)
