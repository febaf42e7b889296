"""The operator's dashboard: one self-contained page and the two small routes it reads.

Why it looks like this: the page is opened by hospital staff on a machine that may have no
internet, so everything it needs is inline (no CDN, no fonts, no images): the plots are SVG
drawn by the page's own script from /status. It is also served to anyone who can reach the
operator listener, so it is static (no node data in it) and fetches its data with the
operator's bearer token; with a token, open it as ``http://HOST:PORT/#token=TOKEN``: the
fragment never leaves the browser, and the page keeps it in sessionStorage and drops it from
the address bar. Every value is inserted as text (``textContent``, SVG attributes), never as
HTML, and a Content-Security-Policy that allows only this page's own script and style (by
hash) and requests to this origin backs that up.

Routes (operator listener only, behind node/api.py's token guard; docs/console.md):

* ``GET /``: the page;
* ``GET /alerts``: node/alerts.py's checks on the node's current status;
* ``GET /audit/recent?limit=N``: the newest N audit records (kind, round, time and a plain
  summary; never the records' full fields).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
from typing import TYPE_CHECKING, Any

from aiohttp import web
from murmur.node.alerts import AlertSettings, evaluate
from murmur.node.audit import AuditRecord, last_records
from murmur.node.wording import REASON_MEANINGS, describe_record

if TYPE_CHECKING:
    from murmur.node.served import ServedNode

DEFAULT_RECENT = 20
MAX_RECENT = 200

_STYLE = """
:root{--ok:#1b7f3b;--warn:#a86400;--bad:#b00020;--muted:#666;--line:#ddd}
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.2em 2em;color:#1d1d1d;max-width:1280px}
h1{margin:0 0 .2em;font-size:1.6em}h2{font-size:1.15em;margin:1.4em 0 .4em}
.muted{color:var(--muted)}.small{font-size:.85em}
table{border-collapse:collapse;margin:.4em 0;font-size:.92em}td,th{border:1px solid var(--line);padding:3px 9px;text-align:right;vertical-align:top}
th{background:#f4f4f4;font-weight:600}td.l,th.l{text-align:left}
tr.bad td{background:#fdecee}tr.warn td{background:#fff6e5}
#alerts{list-style:none;padding:0;margin:.4em 0}#alerts li{padding:.45em .8em;margin:.3em 0;border-left:6px solid;border-radius:3px}
#alerts li.critical{border-color:var(--bad);background:#fdecee}#alerts li.warning{border-color:var(--warn);background:#fff6e5}
#alerts li.ok{border-color:var(--ok);background:#eef8f0}
#checks{list-style:none;padding:0;margin:.2em 0 1em;display:flex;flex-wrap:wrap;gap:.3em .9em;font-size:.85em;color:var(--muted)}
#checks li.alert{color:var(--bad)}
.budgetrow{display:flex;align-items:center;gap:.8em;margin:.5em 0;font-size:.9em}
.budget{height:1em;width:320px;background:#e4e4e4;border-radius:3px;flex:none}
.budget div{height:100%;background:var(--ok);border-radius:3px}.budget.low div{background:var(--warn)}.budget.spent div{background:var(--bad)}
td.t{white-space:nowrap}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(270px,1fr));gap:.8em 1.4em}
figure{margin:0}figcaption{font-weight:600;font-size:.92em}
svg.plot{width:100%;height:auto;background:#fcfcfc;border:1px solid var(--line)}
svg.plot text{font-size:10px;fill:#444}svg.plot .grid{stroke:#e6e6e6}svg.plot .axis{stroke:#999}
svg.plot polyline{fill:none;stroke-width:2}svg.plot .ref{stroke-dasharray:4 3;stroke-width:1}
.legend{font-size:.8em;color:#444}.legend span{margin-right:.9em;white-space:nowrap}.legend i{display:inline-block;width:.9em;height:.25em;margin-right:.3em;vertical-align:middle}
#banner{display:none;padding:.4em .8em;background:var(--bad);color:#fff;border-radius:3px}
"""

_SCRIPT = r"""
"use strict";
const NS="http://www.w3.org/2000/svg";
const WORDS=JSON.parse(document.getElementById("words").textContent);
const PALETTE=["#1f77b4","#d62728","#2ca02c","#9467bd","#ff7f0e","#8c564b","#e377c2","#17becf","#7f7f7f","#bcbd22"];
const RATES=new Set(["auc","sensitivity","specificity","ppv","npv","brier","accuracy","majority_accuracy","threshold","auc_low","auc_high","auc_se","ece","c_index","c_index_low","c_index_high"]);
const m=location.hash.match(/token=([^&]+)/);
if(m){sessionStorage.setItem("murmur_token",decodeURIComponent(m[1]));history.replaceState(null,"",location.pathname)}
const token=sessionStorage.getItem("murmur_token");
const samples=[];  // [time ms, {reason: count}] of the last five minutes, for the rates
const $=id=>document.getElementById(id);
function num(v,d=3){
  if(v===null||v===undefined)return "undefined";
  if(typeof v!=="number")return String(v);
  if(!Number.isFinite(v))return "undefined";
  if(Number.isInteger(v))return String(v);
  if(v!==0&&Math.abs(v)<Math.pow(10,-d))return String(Number(v.toPrecision(2)));
  return v.toFixed(d);
}
// JSON drops the ".0" of a float, so quantities that are never counts get fixed decimals.
function dec(v,d){return typeof v==="number"&&Number.isFinite(v)?v.toFixed(d):num(v)}
function metric(k,v){return RATES.has(k)?dec(v,3):num(v)}
function h(tag,text,cls){const e=document.createElement(tag);if(text!==undefined)e.textContent=text;if(cls)e.className=cls;return e}
function s(tag,attrs,text){const e=document.createElementNS(NS,tag);for(const k in attrs)e.setAttribute(k,String(attrs[k]));if(text!==undefined)e.textContent=text;return e}
function table(id,head,rows,empty){
  const t=$(id);t.replaceChildren();const tr=h("tr");
  head.forEach(([x,cls])=>tr.appendChild(h("th",x,cls||"")));t.appendChild(tr);
  if(!rows.length){const r=h("tr"),c=h("td",empty,"l muted");c.colSpan=head.length;r.appendChild(c);t.appendChild(r);return}
  rows.forEach(({cells,cls})=>{const r=h("tr",undefined,cls||"");
    cells.forEach((c,i)=>r.appendChild(h("td",c,head[i][1]||"")));t.appendChild(r)});
}
function ago(epoch){if(!epoch)return "never";const sec=Math.max(0,Date.now()/1000-epoch);
  return sec<90?Math.round(sec)+" s ago":sec<5400?Math.round(sec/60)+" min ago":Math.round(sec/3600)+" h ago"}
// About n round-numbered ticks in [a, b] (steps of 1, 2, 2.5 or 5 times a power of ten).
function when(iso){const d=new Date(iso);return d.toDateString()===new Date().toDateString()?d.toLocaleTimeString():d.toLocaleString()}
function ticks(a,b,n){const raw=(b-a)/n,p=Math.pow(10,Math.floor(Math.log10(raw)));
  const step=[1,2,2.5,5,10].map(k=>k*p).find(x=>x>=raw*0.999);
  const digits=Math.max(0,-Math.floor(Math.log10(step)+1e-9))+(String(step/p).includes(".")?1:0);
  const out=[];for(let v=Math.ceil(a/step-1e-9)*step;v<=b+step*1e-6;v+=step)out.push([v,v.toFixed(digits)]);return out}
// A line plot into <svg id>: series [{name, pts:[[x,y]...]}] (y null: a gap), refs [{y,label,color}].
function plot(id,series,o){
  const svg=$(id);svg.replaceChildren();
  const W=420,H=200,L=46,R=12,T=12,B=30;svg.setAttribute("viewBox",`0 0 ${W} ${H}`);
  const xs=[],ys=[];
  series.forEach(q=>q.pts.forEach(([x,y])=>{xs.push(x);if(y!==null&&Number.isFinite(y))ys.push(y)}));
  (o.refs||[]).forEach(r=>ys.push(r.y));
  if(!ys.length){svg.appendChild(s("text",{x:W/2,y:H/2,"text-anchor":"middle",class:"empty"},"no rounds yet"));return}
  let x0=Math.min(1,...xs),x1=Math.max(o.xmax||1,...xs);if(x1<=x0)x1=x0+1;
  let y0=o.ymin!==undefined?Math.min(o.ymin,...ys):Math.min(...ys),y1=o.ymax!==undefined?Math.max(o.ymax,...ys):Math.max(...ys);
  if(y1-y0<1e-9){y1=y0+(Math.abs(y0)||1)*0.1}
  if(o.pad){y1+=(y1-y0)*0.08}
  const X=x=>L+(x-x0)/(x1-x0)*(W-L-R),Y=y=>T+(1-(y-y0)/(y1-y0))*(H-T-B);
  ticks(y0,y1,4).forEach(([v,label])=>{svg.appendChild(s("line",{x1:L,x2:W-R,y1:Y(v),y2:Y(v),class:"grid"}));
    svg.appendChild(s("text",{x:L-5,y:Y(v)+3,"text-anchor":"end"},label))});
  const step=Math.max(1,Math.ceil((x1-x0)/6));
  for(let x=Math.ceil(x0);x<=x1;x+=step)svg.appendChild(s("text",{x:X(x),y:H-B+13,"text-anchor":"middle"},String(x)));
  svg.appendChild(s("text",{x:(L+W-R)/2,y:H-4,"text-anchor":"middle"},"round"));
  svg.appendChild(s("line",{x1:L,x2:L,y1:T,y2:H-B,class:"axis"}));
  svg.appendChild(s("line",{x1:L,x2:W-R,y1:H-B,y2:H-B,class:"axis"}));
  (o.refs||[]).forEach(r=>{svg.appendChild(s("line",{x1:L,x2:W-R,y1:Y(r.y),y2:Y(r.y),class:"ref",stroke:r.color}));
    svg.appendChild(s("text",{x:W-R-2,y:Y(r.y)-3,"text-anchor":"end",fill:r.color},r.label))});
  series.forEach((q,i)=>{const color=q.color||PALETTE[i%PALETTE.length];let seg=[];
    const flush=()=>{if(seg.length>1)svg.appendChild(s("polyline",{points:seg.join(" "),stroke:color,"data-series":q.name}));seg=[]};
    q.pts.forEach(([x,y])=>{if(y===null||!Number.isFinite(y)){flush();return}seg.push(X(x).toFixed(1)+","+Y(y).toFixed(1))});flush();
    if(q.pts.length<=60)q.pts.forEach(([x,y])=>{if(y===null||!Number.isFinite(y))return;
      const c=s("circle",{cx:X(x).toFixed(1),cy:Y(y).toFixed(1),r:2.2,fill:color});c.appendChild(s("title",{},`${q.name} round ${x}: ${dec(y,3)}`));svg.appendChild(c)})});
  const legend=$(id+"-legend");legend.replaceChildren();
  if(series.length>1)series.forEach((q,i)=>{const sp=h("span"),sw=h("i");sw.style.background=q.color||PALETTE[i%PALETTE.length];
    sp.appendChild(sw);sp.appendChild(document.createTextNode(q.name));legend.appendChild(sp)});
}
function banner(text){const b=$("banner");b.textContent=text||"";b.style.display=text?"block":"none"}
async function get(path){
  const r=await fetch(path,{headers:token?{"Authorization":"Bearer "+token}:{},cache:"no-store"});
  if(r.status===401)throw new Error("unauthorized");
  if(!r.ok)throw new Error(path+": HTTP "+r.status);
  return r.json();
}
function showSummary(st){
  $("title").textContent="murmur node "+st.name;document.title="murmur · "+st.name;
  const p=st.privacy||{},sum=$("summary");sum.replaceChildren();
  const part=(label,value)=>{sum.appendChild(document.createTextNode(label));sum.appendChild(h("b",value))};
  part("round ",`${num(st.round)} of ${num(st.planned_rounds)}`);part(" · phase ",String(st.phase));
  part(" · model ",(st.model_sha256||"").slice(0,12)||"-");part(" · key ",(st.public_key||"").slice(0,16));
  sum.appendChild(document.createTextNode(" · updated "+new Date().toLocaleTimeString()));
  const bar=$("budget"),fill=$("budget-fill"),label=$("budget-label");
  if(p.enabled&&p.epsilon_budget>0){const f=Math.max(0,p.epsilon_spent)/p.epsilon_budget;
    fill.style.width=Math.min(100,100*f).toFixed(1)+"%";bar.className="budget"+(f>=0.999||p.remaining_steps===0?" spent":f>=0.8?" low":"");
    label.textContent=`privacy spent: ε ${dec(p.epsilon_spent,3)} of ${dec(p.epsilon_budget,3)} (${(100*f).toFixed(0)}%), δ ${num(p.delta)}`;
  }else{fill.style.width="0";bar.className="budget spent";label.textContent="differential privacy is OFF"}
}
function showAlerts(a){
  const ul=$("alerts");ul.replaceChildren();
  if(!a.alerts.length){ul.appendChild(h("li","No alerts.","ok"))}
  a.alerts.forEach(x=>{const li=h("li",undefined,x.level);li.dataset.code=x.code;li.appendChild(h("b",x.title));
    li.appendChild(document.createTextNode(" — "+x.detail));ul.appendChild(li)});
  const cl=$("checks");cl.replaceChildren();
  a.checks.forEach(c=>{const mark=c.state==="ok"?"✓":c.state==="alert"?"⚠":"…";
    const li=h("li",`${mark} ${c.label}: ${c.detail}`,c.state);li.dataset.code=c.code;cl.appendChild(li)});
}
function showPlots(st){
  const hist=st.history||[],p=st.privacy||{},planned=st.planned_rounds;
  plot("plot-auc",[{name:"AUC",pts:hist.map(r=>[r.round,r.auc])}],{ymin:0.5,ymax:1.02,xmax:planned});
  const refs=p.enabled&&p.epsilon_budget>0?[{y:p.epsilon_budget,label:"budget",color:"#b00020"},{y:0.8*p.epsilon_budget,label:"80%",color:"#a86400"}]:[];
  plot("plot-eps",[{name:"ε spent",pts:hist.map(r=>[r.round,r.epsilon])}],{ymin:0,xmax:planned,refs});
  plot("plot-dis",[{name:"distance",pts:hist.map(r=>[r.round,r.neighbour_distance])}],{ymin:0,xmax:planned,pad:true});
  const th=st.trust_history||{},rounds=hist.map(r=>r.round);
  plot("plot-trust",Object.entries(th).map(([peer,v])=>({name:peer,
    pts:v.map((y,i)=>[v.length===rounds.length?rounds[i]:i+1,y])})),{ymin:-0.04,ymax:1.04,xmax:planned,
    refs:[{y:0.2,label:"quarantine",color:"#b00020"}]});
}
function showPeers(st,a){
  const rows=Object.entries(st.peers||{}).map(([name,v])=>{
    const standing=(a.peers||{})[name]||{standing:"",silent_rounds:0,left_out:[]};
    // The node's own liveness fields where /status has them (state, why, contact), else
    // what the rounds show.
    const heard=!v.last_round?"not heard yet":standing.silent_rounds>0?`silent for ${standing.silent_rounds} round(s)`:"sending";
    let reach=heard;
    if(v.state==="down")reach="down"+(v.why?": "+v.why:"");
    else if(v.state)reach="up · "+heard;
    if(v.contact==="refused"||v.contact==="unreachable")reach+=` · ${v.contact}`+(v.contact_detail?": "+v.contact_detail:"");
    const trust=(st.trust||{})[name];
    const bad=["quarantined","proven equivocation","rolled back"].includes(standing.standing);
    return {cls:bad?"bad":(standing.standing==="low trust"||standing.silent_rounds>0||v.state==="down"||v.contact==="refused")?"warn":"",
      cells:[name,reach,num(v.last_round),ago(v.last_seen),dec(trust,2),
        standing.standing,standing.left_out.join("; ")||"-"]}});
  table("peers",[["neighbour","l"],["reachability","l"],["last round"],["last heard"],["trust"],["standing","l"],["left out of aggregation","l"]],rows,"no neighbours configured");
}
function showRejected(st){
  const counts=st.rejected||{},now=Date.now();samples.push([now,counts]);
  while(samples.length>2&&now-samples[0][0]>300000)samples.shift();
  const [t0,c0]=samples[0],minutes=(now-t0)/60000,rounds=Math.max(1,st.round||0);
  const rows=Object.entries(counts).sort((x,y)=>y[1]-x[1]).map(([reason,n])=>({cells:[reason,WORDS.reasons[reason]||"",num(n),
    num(n/rounds,1),minutes>=0.05?num(Math.max(0,n-(c0[reason]||0))/minutes,1):"…"]}));
  table("rejected",[["reason","l"],["meaning","l"],["count"],["per round"],["per minute, recent"]],rows,"none so far");
}
function showMetrics(st){
  table("metrics",[["metric","l"],["value"]],Object.entries(st.last_metrics||{}).filter(([k,v])=>v===null||typeof v!=="object").map(([k,v])=>({cells:[k,metric(k,v)]})),"no evaluation yet");
}
function showAudit(r){
  const loud=new Set(["quarantine","equivocation_proof","rollback_detected","startup_refused","adversary_mode","peer_down"]);
  table("audit",[["record"],["time","l t"],["kind","l"],["round"],["what happened","l"]],r.records.slice().reverse().map(x=>({
    cls:loud.has(x.kind)?"bad":"",cells:[num(x.seq),when(x.time_utc),x.kind,num(x.round),x.summary]})),"no records yet");
}
async function refresh(){
  try{
    const [st,a,r]=await Promise.all([get("/status"),get("/alerts"),get("/audit/recent?limit=12")]);
    banner("");showSummary(st);showAlerts(a);showPlots(st);showPeers(st,a);showRejected(st);showMetrics(st);showAudit(r);
    document.body.dataset.loaded="1";
  }catch(e){
    banner(e.message==="unauthorized"?"Unauthorized: open this page as /#token=TOKEN (the operator token).":"The node is not answering ("+e.message+"); showing the last data received.");
  }
}
refresh();setInterval(refresh,2000);
"""


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def _words_json() -> str:
    """The plain meanings of reason codes, as a JSON data block safe inside <script>."""
    doc = {"reasons": REASON_MEANINGS}
    return re.sub(r"[<>&]", lambda m: f"\\u{ord(m.group()):04x}", json.dumps(doc))


DASHBOARD_HTML = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>murmur node</title>
<meta name="referrer" content="no-referrer">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<style>{_STYLE}</style></head><body>
<h1 id="title">murmur node</h1>
<p id="summary" class="muted">loading…</p>
<div class="budgetrow"><div id="budget" class="budget"><div id="budget-fill"></div></div><span id="budget-label"></span></div>
<p id="banner"></p>
<h2>Alerts</h2><ul id="alerts"><li class="ok">loading…</li></ul><ul id="checks"></ul>
<div class="plots">
<figure><figcaption>Test AUC per round</figcaption><svg id="plot-auc" class="plot"></svg><div id="plot-auc-legend" class="legend"></div></figure>
<figure><figcaption>Privacy spent (ε) per round</figcaption><svg id="plot-eps" class="plot"></svg><div id="plot-eps-legend" class="legend"></div></figure>
<figure><figcaption>Disagreement with neighbours</figcaption><svg id="plot-dis" class="plot"></svg><div id="plot-dis-legend" class="legend"></div></figure>
<figure><figcaption>Trust in each neighbour</figcaption><svg id="plot-trust" class="plot"></svg><div id="plot-trust-legend" class="legend"></div></figure>
</div>
<h2>Neighbours</h2><table id="peers"></table>
<h2>Rejected messages</h2><table id="rejected"></table>
<h2>Last evaluation (held-out test patients)</h2><table id="metrics"></table>
<h2>Audit log: newest records</h2><table id="audit"></table>
<p class="muted small">Refreshes every 2 seconds. Compliance report: <code>murmur audit report --state DIR --out report.html</code> (docs/audit.md).</p>
<script id="words" type="application/json">{_words_json()}</script>
<script>{_SCRIPT}</script></body></html>
"""

# Only this page's own script and style run; requests go to this origin only (docs/console.md).
DASHBOARD_CSP = (
    f"default-src 'none'; script-src {_csp_hash(_SCRIPT)}; style-src {_csp_hash(_STYLE)}; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


def _node(request: web.Request) -> ServedNode:
    from murmur.node.api import NODE_KEY  # node.api imports this module for its route table

    return request.app[NODE_KEY]


async def dashboard(request: web.Request) -> web.Response:
    """GET /: the static page (no node data in it)."""
    return web.Response(
        text=DASHBOARD_HTML,
        content_type="text/html",
        headers={
            "Content-Security-Policy": DASHBOARD_CSP,
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-store",
        },
    )


def recent_json(records: list[AuditRecord]) -> dict[str, Any]:
    """What GET /audit/recent answers: per record its seq, kind, round, time and a summary."""
    return {
        "records": [
            {
                "seq": r.seq,
                "kind": r.kind,
                "round": r.round,
                "time_utc": r.time_utc,
                "summary": describe_record(r),
            }
            for r in records
        ]
    }


async def audit_recent(request: web.Request) -> web.Response:
    """GET /audit/recent?limit=N (1..200, default 20): the newest records, oldest first."""
    raw = request.query.get("limit", str(DEFAULT_RECENT))
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_RECENT:
        return web.json_response({"reason": "bad_limit"}, status=400)
    node = _node(request)
    records = await asyncio.to_thread(last_records, node.audit.path, int(raw))
    return web.json_response(recent_json(records), headers={"Cache-Control": "no-store"})


async def alerts(request: web.Request) -> web.Response:
    """GET /alerts: every check of node/alerts.py on the node's current status."""
    node = _node(request)

    def newest(kind: str) -> AuditRecord | None:
        found = last_records(node.audit.path, 1, kinds=(kind,))
        return found[0] if found else None

    last_sent, last_aggregation = await asyncio.to_thread(
        lambda: (newest("update_sent"), newest("aggregation"))
    )
    report = evaluate(
        node.status(),
        AlertSettings.from_config(node.config),
        last_sent=last_sent,
        last_aggregation=last_aggregation,
    )
    return web.json_response(report.to_json(), headers={"Cache-Control": "no-store"})
