//! The read-only status page: `GET /` (a small self-contained HTML page),
//! `GET /status.json`, `GET /events` (server-sent events, one `status` event
//! per change plus a comment every 5 s to keep proxies from closing the stream),
//! `GET /console.json` (the deployment console of the latest runs,
//! [`super::console`]; the newest is also `console` in every status) and
//! `GET /metrics` for Prometheus ([`super::metrics`]).
//!
//! It binds to loopback unless the operator passes `--public-status`: the page names
//! files, hashes and errors, which is not for the whole network. Every other method
//! or path is refused; nothing here changes the service.
//!
//! HTTP is axum's (on hyper), never framed by hand: the adversarial review held
//! the old hand-framed listener with idle event streams. This module owns the
//! limits around it: at most [`MAX_CONNECTIONS`] connections (taken before
//! `accept`, so a flood waits in the kernel backlog instead of costing
//! descriptors), [`MAX_EVENT_STREAMS`] of them event streams, an idle timeout on
//! every connection, a deadline on each request's answer (tower's timeout), and
//! a Host check against DNS rebinding. The control socket
//! has its own budget in [`super::control`]. The content comes from
//! [`Service::status`]; this module must not change the service.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::service::Service;

/// Connections served at once; past it, new ones wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 256;
/// Event streams open at once; past it, `/events` answers 503 (browsers retry).
pub const MAX_EVENT_STREAMS: usize = 64;
/// A connection that moves no byte either way for this long is closed. Event
/// streams write a keepalive every [`KEEPALIVE`], so a live one never reaches it;
/// short, because a held slot is a slot a real browser waits for.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a request may take to produce its response head (an event stream's
/// head comes at once; its body is bounded by [`MAX_STREAM_LIFE`]).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often an event stream writes a comment when nothing changed.
pub const KEEPALIVE: Duration = Duration::from_secs(5);
/// An event stream is closed after this long; `EventSource` reconnects by itself,
/// so a forgotten tab cannot hold a slot forever.
pub const MAX_STREAM_LIFE: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("--listen {addr} is not a loopback address; the status page binds to 127.0.0.1 or ::1 unless you pass --public-status")]
    NotLoopback { addr: SocketAddr },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

pub async fn bind(addr: SocketAddr, public: bool) -> Result<TcpListener, StatusError> {
    if !public && !addr.ip().is_loopback() {
        return Err(StatusError::NotLoopback { addr });
    }
    TcpListener::bind(addr)
        .await
        .map_err(|source| StatusError::Bind { addr, source })
}

#[derive(Clone)]
struct Page {
    service: Arc<Service>,
    listen: Option<SocketAddr>,
    streams: Arc<Semaphore>,
}

pub async fn serve(listener: TcpListener, service: Arc<Service>) {
    let listen = listener.local_addr().ok();
    let page = Page {
        service,
        listen,
        streams: Arc::new(Semaphore::new(MAX_EVENT_STREAMS)),
    };
    let app = Router::new()
        .route("/", get(index))
        .route("/index.html", get(index))
        .route("/status.json", get(status_json))
        .route("/events", get(events))
        .route("/metrics", get(metrics))
        .route("/console.json", get(console_json))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            page.clone(),
            check_host,
        ))
        .layer(
            tower::ServiceBuilder::new()
                .layer(axum::error_handling::HandleErrorLayer::new(
                    |_: tower::BoxError| async {
                        plain(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "text/plain",
                            "the status page took too long to answer; retry\n".into(),
                        )
                    },
                ))
                .layer(tower::timeout::TimeoutLayer::new(REQUEST_TIMEOUT)),
        )
        .with_state(page);
    let capped = Capped {
        inner: listener,
        budget: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
    };
    if let Err(e) = axum::serve(capped, app).await {
        tracing::error!(error = %e, "status page stopped");
    }
}

/// Whether a request's `Host` may reach the page. DNS rebinding makes a browser
/// send an attacker's own name here; only names that cannot be rebound pass: an
/// IP literal, `localhost`, and this machine's host name, each with the port the
/// page listens on (or none).
pub fn host_allowed(host: &str, listen: Option<SocketAddr>) -> bool {
    let host = host.trim();
    let (name, port) = match host.rsplit_once(':') {
        // `[::1]:8080`, `127.0.0.1:8080`, `name:8080`; a bare IPv6 literal has
        // several colons and only counts when bracketed.
        Some((n, p)) if !n.is_empty() && (n.ends_with(']') || !n.contains(':')) => {
            match p.parse::<u16>() {
                Ok(p) => (n, Some(p)),
                Err(_) => return false,
            }
        }
        _ => (host, None),
    };
    if let (Some(p), Some(l)) = (port, listen) {
        if p != l.port() {
            return false;
        }
    }
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<IpAddr>().is_ok() {
        return true;
    }
    let lower = bare.to_ascii_lowercase();
    let lower = lower.trim_end_matches('.');
    lower == "localhost"
        || lower.ends_with(".localhost")
        || own_hostname().is_some_and(|h| h.eq_ignore_ascii_case(lower))
}

fn own_hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates
    // within it or reports an error.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    std::str::from_utf8(&buf[..end]).ok().map(str::to_string)
}

async fn check_host(
    State(page): State<Page>,
    headers: HeaderMap,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !host_allowed(host, page.listen) {
        return (
            StatusCode::MISDIRECTED_REQUEST,
            [(header::CONNECTION, "close")],
            "this status page answers only to its own address (an IP literal, localhost or this machine's name)\n",
        )
            .into_response();
    }
    let mut resp = next.run(req).await;
    // One request per connection, as before: a kept-alive idle connection would
    // hold one of the few slots until the idle timeout.
    resp.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    resp
}

fn plain(code: StatusCode, ctype: &'static str, body: String) -> Response {
    (
        code,
        [
            (header::CONTENT_TYPE, ctype),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

async fn index() -> Response {
    plain(StatusCode::OK, "text/html; charset=utf-8", PAGE.to_string())
}

async fn status_json(State(page): State<Page>) -> Response {
    let body = serde_json::to_string_pretty(&with_console(&page.service)).unwrap_or_default();
    plain(StatusCode::OK, "application/json", body)
}

/// `?snapshot` on the page (passed on to `/events`): the stream ends after its
/// first event, so a headless browser that waits for the network to go quiet
/// (a screenshot, a printout) gets the page drawn from one event.
fn snapshot(uri: &axum::http::Uri) -> bool {
    uri.query().is_some_and(|q| {
        q.split('&')
            .any(|p| p == "snapshot" || p.starts_with("snapshot="))
    })
}

/// The service's status with the newest run's console as `console`.
fn with_console(service: &Service) -> serde_json::Value {
    let mut status = service.status();
    if let serde_json::Value::Object(m) = &mut status {
        let console = serde_json::to_value(service.console().latest()).unwrap_or_default();
        m.insert("console".into(), console);
    }
    status
}

async fn console_json(State(page): State<Page>) -> Response {
    let body = serde_json::to_string_pretty(&page.service.console().runs()).unwrap_or_default();
    plain(StatusCode::OK, "application/json", body)
}

async fn metrics(State(page): State<Page>) -> Response {
    plain(
        StatusCode::OK,
        super::metrics::CONTENT_TYPE,
        super::metrics::render(&page.service),
    )
}

async fn not_found(method: axum::http::Method) -> Response {
    if method != axum::http::Method::GET {
        return plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "the status page is read-only\n".into(),
        );
    }
    plain(
        StatusCode::NOT_FOUND,
        "text/plain",
        "not found; try /, /status.json, /console.json, /events or /metrics\n".into(),
    )
}

async fn events(State(page): State<Page>, uri: axum::http::Uri) -> Response {
    let Ok(permit) = page.streams.clone().try_acquire_owned() else {
        return plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!("too many event streams open (at most {MAX_EVENT_STREAMS}); poll /status.json or retry later\n"),
        );
    };
    let rx = page.service.subscribe();
    let deadline = tokio::time::Instant::now() + MAX_STREAM_LIFE;
    struct St {
        service: Arc<Service>,
        rx: tokio::sync::watch::Receiver<u64>,
        first: bool,
        deadline: tokio::time::Instant,
        _permit: OwnedSemaphorePermit,
    }
    let once = snapshot(&uri);
    let st = St {
        service: page.service.clone(),
        rx,
        first: true,
        deadline,
        _permit: permit,
    };
    let stream = futures_util::stream::unfold(st, move |mut st| async move {
        if !st.first && once {
            return None;
        }
        if !st.first {
            let changed = tokio::time::timeout_at(st.deadline, st.rx.changed()).await;
            match changed {
                Ok(Ok(())) => {}
                // Service gone, or the stream's life is over: end it (the permit drops).
                _ => return None,
            }
            // Coalesce bursts (progress of many hosts) into one event.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        st.first = false;
        st.rx.borrow_and_update();
        let data = serde_json::to_string(&with_console(&st.service)).unwrap_or_default();
        let ev = Event::default().event("status").data(data);
        Some((Ok::<_, std::convert::Infallible>(ev), st))
    });
    let mut resp = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEPALIVE).text("keepalive"))
        .into_response();
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    resp
}

/// The listener axum serves: one permit per connection, taken before `accept`.
struct Capped {
    inner: TcpListener,
    budget: Arc<Semaphore>,
}

impl axum::serve::Listener for Capped {
    type Io = Guarded;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok(permit) = self.budget.clone().acquire_owned().await else {
                // The semaphore is never closed; wait forever rather than spin.
                std::future::pending::<()>().await;
                continue;
            };
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    return (
                        Guarded {
                            stream,
                            _permit: permit,
                            idle: Box::pin(tokio::time::sleep(IDLE_TIMEOUT)),
                        },
                        addr,
                    );
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning on accept.
                    tracing::warn!(error = %e, "status page: accept failed");
                    drop(permit);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection holding its slot, closed when no byte moves for [`IDLE_TIMEOUT`].
struct Guarded {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    idle: Pin<Box<tokio::time::Sleep>>,
}

impl Guarded {
    fn progressed(&mut self) {
        self.idle
            .as_mut()
            .reset(tokio::time::Instant::now() + IDLE_TIMEOUT);
    }

    /// Called when an operation would wait: errors once the idle time is up.
    fn check_idle(&mut self, cx: &mut Context<'_>) -> std::io::Result<()> {
        match self.idle.as_mut().poll(cx) {
            Poll::Ready(()) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "idle connection closed",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

use std::future::Future as _;

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.progressed();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match self.check_idle(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.stream).poll_write(cx, data) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.progressed();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match self.check_idle(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

const PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>patchbook watch</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}
h1{font-size:1.3em}h2{font-size:1.05em;margin-top:1.5em}
table{border-collapse:collapse}td,th{padding:2px 10px;text-align:left;border-bottom:1px solid #ddd}
code,pre{font:12px ui-monospace,monospace}pre{background:#fee;padding:8px;white-space:pre-wrap}
.ok{color:#070}.bad{color:#b00}
.counts span{display:inline-block;min-width:6em;margin-right:8px;padding:6px 10px;background:#f3f3f3;border-radius:4px}
.counts b{display:block;font-size:1.6em}.state-in_progress{color:#a60}.state-failed,.state-unreachable{color:#b00}.state-patched{color:#070}
</style></head><body>
<h1>patchbook watch</h1>
<div id="gen">connecting…</div>
<h2>Deployment console</h2><div id="console" data-updates="0"><p>waiting for the event stream…</p></div>
<h2>Last reload error</h2><div id="err"></div>
<h2>Run in flight</h2><div id="runs"></div>
<h2>Scheduled runs</h2><div id="sched"></div>
<h2>Recent runs</h2><div id="recent"></div>
<h2>Hosts under soak</h2><div id="soak"></div>
<h2>Files</h2><div id="files"></div>
<script>
const esc=s=>String(s??'').replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));
const table=(cols,rows)=>rows.length?'<table><tr>'+cols.map(c=>'<th>'+esc(c)+'</th>').join('')+'</tr>'+rows.map(r=>'<tr>'+r.map(v=>'<td>'+v+'</td>').join('')+'</tr>').join('')+'</table>':'<p>none</p>';
function render(s){
  const g=s.generation;
  document.getElementById('gen').innerHTML=g?`Generation <b>${g.number}</b> live since ${esc(g.created)} · ${g.playbooks.length} playbooks · inputs <code>${esc(g.input_hash.slice(0,16))}</code> · clock ${esc(s.now)}${s.stopping?' · <b class="bad">stopping</b>':''}`:'<b class="bad">no generation live</b>';
  const e=s.last_error;
  document.getElementById('err').innerHTML=e?e.errors.map(x=>`<pre>${esc(x.message)}</pre>`).join(''):'<p class="ok">none</p>';
  const p=r=>`${r.progress.targeted} targeted, ${r.progress.done} done, ${r.progress.in_progress} in progress, ${r.progress.failed} failed, ${r.progress.unreachable} unreachable, ${r.progress.pending} pending`;
  document.getElementById('runs').innerHTML=table(['playbook','run','generation','sha256','progress'],s.runs.in_flight.map(r=>[esc(r.playbook),esc(r.run_id),r.generation,'<code>'+esc(r.sha256.slice(0,16))+'</code>',p(r)]));
  document.getElementById('sched').innerHTML=table(['playbook','schedule','next start','skipped (overlap)'],s.schedules.map(x=>[esc(x.playbook),esc(x.spec),esc(x.next_start_local??x.next_start),x.skipped_overlaps]));
  document.getElementById('recent').innerHTML=table(['playbook','run','generation','ok','summary'],s.runs.recent.map(r=>[esc(r.playbook),esc(r.run_id),r.generation,r.ok?'<span class="ok">yes</span>':'<span class="bad">no</span>',esc(r.summary)]));
  document.getElementById('soak').innerHTML=table(['host','run','until','samples','verdict'],(s.soak??[]).map(x=>[esc(x.host),esc(x.run),esc(x.until),x.samples,x.verdict==='regressed'?'<span class="bad">regressed</span>':x.verdict==='passed'?'<span class="ok">passed</span>':esc(x.verdict)]));
  document.getElementById('files').innerHTML=g?table(['file','kind','sha256'],g.files.map(f=>[esc(f.path),esc(f.kind),'<code>'+esc(f.sha256)+'</code>'])):'';
}
fetch('status.json').then(r=>r.json()).then(render);
const es=new EventSource('events'+location.search);es.addEventListener('status',ev=>{const s=JSON.parse(ev.data);render(s);renderConsole(s.console)});
</script>
<script>
// The console redraws on each event of the stream, never by reloading the page.
let updates=0;
const kib=b=>(Number(b||0)/1024).toFixed(1);
function left(until){const s=Math.max(0,(Date.parse(until)-Date.now())/1000);return s>0?`${s.toFixed(0)} s left`:'over';}
function renderConsole(c){
  const el=document.getElementById('console');updates++;el.dataset.updates=updates;
  if(!c){el.innerHTML='<p>no run yet</p>';return;}
  el.dataset.run=c.run_id;el.dataset.seq=c.seq;el.dataset.finished=c.finished;
  const t=c.tally,box=(k,label)=>`<span id="c-${k}">${label}<b>${t[k]}</b></span>`;
  const u=c.controller;
  const ctl=u?`Controller: CPU <span id="ctl-cpu">${u.cpu_seconds.toFixed(2)}</span> s · memory <span id="ctl-rss">${(u.rss_kib/1024).toFixed(1)}</span> MiB · sent <span id="ctl-sent">${kib(u.bytes_sent)}</span> KiB · received <span id="ctl-received">${kib(u.bytes_received)}</span> KiB · <span id="ctl-connections">${u.connections}</span> connections open (sample ${c.controller_samples}, ${esc(u.at)})`:'Controller: no sample yet';
  const timers=w=>w.timers.map(x=>`${esc(x.kind)} ${x.seconds.toFixed(0)} s, <span class="timer" data-until="${esc(x.until)}">${left(x.until)}</span>`).join('<br>');
  const gate=g=>g?`<span class="${g.passed?'ok':'bad'}">${g.passed?'passed':'FAILED'}</span> (${esc(g.check)}: ${esc(g.detail)})`:'—';
  el.innerHTML=`<p>run <code>${esc(c.run_id)}</code> (${esc(c.playbook)})${c.finished?' · finished':''}${c.stopped?` · <b class="bad">stopped: ${esc(c.stopped)}</b>`:''}</p>`+
    `<div class="counts">${box('targeted','targeted')}${box('patched','patched')}${box('in_progress','in progress')}${box('failed','failed')}${box('unreachable','unreachable')}${box('pending','pending')}</div>`+
    `<p id="controller">${ctl}</p><h3>Waves</h3>`+
    table(['wave','hosts','state','gate','soak / pause'],c.waves.map(w=>[esc(w.label),w.hosts.length,`<span class="wave" data-state="${w.state}">${esc(w.state)}</span>`,gate(w.gate),timers(w)]))+
    '<h3>Hosts</h3>'+
    table(['host','wave','state','last step'],c.hosts.map(h=>[esc(h.name),h.wave??'',`<span class="host state-${h.state}" data-host="${esc(h.name)}" data-state="${h.state}">${esc(h.state.replace('_',' '))}${h.rolled_back?' (rolled back)':''}</span>`,esc(h.last_step)]));
}
setInterval(()=>document.querySelectorAll('.timer').forEach(x=>x.textContent=left(x.dataset.until)),1000);
</script></body></html>
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unrebindable_host_names_pass() {
        let l: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        for ok in [
            "127.0.0.1:8080",
            "localhost:8080",
            "LOCALHOST",
            "[::1]:8080",
            "127.0.0.1",
        ] {
            assert!(host_allowed(ok, Some(l)), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8080",
            "",
            "127.0.0.1:9999",
            "localhost:x",
            "localhost.evil.example:8080",
        ] {
            assert!(!host_allowed(bad, Some(l)), "{bad}");
        }
    }
}
