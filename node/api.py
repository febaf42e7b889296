"""The node's HTTP API: peers POST envelopes; operators read health, status, metrics and a page.

Request bodies are capped before they are read into memory: aiohttp's `client_max_size` stops
reading past the limit, and a Content-Length over the limit is refused without reading at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from node.peer_probe import probe_handler

if TYPE_CHECKING:
    from node.node import HospitalNode

NODE_KEY = web.AppKey("node", "HospitalNode")


def build_app(node: HospitalNode) -> web.Application:
    app = web.Application(client_max_size=node.limits.max_message_bytes)
    app[NODE_KEY] = node
    app.router.add_post("/gossip", gossip)
    app.router.add_post("/probe", probe_handler(node))
    app.router.add_get("/health", health)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", dashboard)
    return app


async def start_api(node: HospitalNode, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(build_app(node), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def gossip(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    limit = node.limits.max_message_bytes
    if request.content_length is not None and request.content_length > limit:
        detail = f"{request.content_length} bytes > limit {limit}"
        node.record_rejection("too_large", detail, sender=None, round_=None)
        return web.json_response({"reason": "too_large", "detail": detail}, status=413)
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        detail = f"body over limit {limit}"
        node.record_rejection("too_large", detail, sender=None, round_=None)
        return web.json_response({"reason": "too_large", "detail": detail}, status=413)
    status_code, reason, detail = node.receive(body)
    return web.json_response({"reason": reason, "detail": detail}, status=status_code)


async def health(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    return web.json_response({"ok": True, "name": node.config.node.name, "round": node.state.round})


async def status(request: web.Request) -> web.Response:
    return web.json_response(request.app[NODE_KEY].status(), dumps=_dumps)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[NODE_KEY].metrics.render()
    return web.Response(
        body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )


async def dashboard(request: web.Request) -> web.Response:
    return web.Response(text=DASHBOARD_HTML, content_type="text/html")


def _dumps(obj: object) -> str:
    import json

    return json.dumps(obj, default=str)


# A self-contained page (no network access needed) that polls /status every two seconds.
DASHBOARD_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>murmur node</title>
<style>
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}.warn{color:#b00}
</style></head><body>
<h1 id="title">murmur node</h1>
<p id="summary">loading…</p>
<h2>Last evaluation</h2><table id="metrics"></table>
<h2>Peers</h2><table id="peers"></table>
<h2>Rejected messages</h2><table id="rejected"></table>
<script>
function fmt(v){return v===null||v===undefined?"undefined":(typeof v==="number"?v.toFixed(4):String(v))}
function rows(el,head,data){el.innerHTML="<tr>"+head.map(h=>"<th>"+h+"</th>").join("")+"</tr>"+
  data.map(r=>"<tr>"+r.map(c=>"<td>"+fmt(c)+"</td>").join("")+"</tr>").join("")}
async function refresh(){
  try{
    const s=await (await fetch("/status")).json();
    document.getElementById("title").textContent="murmur node "+s.name;
    const p=s.privacy||{};
    document.getElementById("summary").innerHTML="round <b>"+s.round+"</b> of "+s.planned_rounds+
      " · phase <b>"+s.phase+"</b> · ε spent <b>"+fmt(p.epsilon_spent)+"</b>"+
      (p.epsilon_budget?" of "+fmt(p.epsilon_budget):"")+" · model "+(s.model_sha256||"").slice(0,12);
    rows(document.getElementById("metrics"),["metric","value"],Object.entries(s.last_metrics||{}));
    rows(document.getElementById("peers"),["peer","last round","address"],
      Object.entries(s.peers).map(([n,v])=>[n,v.last_round,v.address]));
    rows(document.getElementById("rejected"),["reason","count"],Object.entries(s.rejected||{}));
  }catch(e){document.getElementById("summary").innerHTML='<span class="warn">node not answering</span>'}
}
refresh();setInterval(refresh,2000);
</script></body></html>
"""
