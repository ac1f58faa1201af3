//! The read-only status page: `GET /` (a small self-contained HTML page),
//! `GET /status.json`, and `GET /events` (server-sent events, one `status` event
//! per change plus a comment every 15 s to keep proxies from closing the stream).
//!
//! It binds to loopback unless the operator passes `--public-status`: the page names
//! files, hashes and errors, which is not for the whole network. Every other method
//! or path is refused; nothing here changes the service.
//!
//! This module owns HTTP framing only; the content comes from [`Service::status`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::service::Service;

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

pub async fn serve(listener: TcpListener, service: Arc<Service>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let service = service.clone();
        tokio::spawn(async move {
            let _ = answer(stream, service).await;
        });
    }
}

async fn read_head(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

async fn respond(
    stream: &mut TcpStream,
    code: &str,
    ctype: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

async fn answer(mut stream: TcpStream, service: Arc<Service>) -> std::io::Result<()> {
    let head = read_head(&mut stream).await?;
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if method != "GET" {
        return respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            "the status page is read-only\n",
        )
        .await;
    }
    match path {
        "/" | "/index.html" => {
            respond(&mut stream, "200 OK", "text/html; charset=utf-8", PAGE).await
        }
        "/status.json" => {
            let body = serde_json::to_string_pretty(&service.status()).unwrap_or_default();
            respond(&mut stream, "200 OK", "application/json", &body).await
        }
        "/events" => events(stream, service).await,
        _ => {
            respond(
                &mut stream,
                "404 Not Found",
                "text/plain",
                "not found; try /, /status.json or /events\n",
            )
            .await
        }
    }
}

async fn events(mut stream: TcpStream, service: Arc<Service>) -> std::io::Result<()> {
    stream
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n")
        .await?;
    let mut rx = service.subscribe();
    loop {
        rx.borrow_and_update();
        let data = serde_json::to_string(&service.status()).unwrap_or_default();
        stream
            .write_all(format!("event: status\ndata: {data}\n\n").as_bytes())
            .await?;
        loop {
            match tokio::time::timeout(Duration::from_secs(15), rx.changed()).await {
                Ok(Ok(())) => break,
                Ok(Err(_)) => return Ok(()),
                Err(_) => stream.write_all(b": keepalive\n\n").await?,
            }
        }
        // Coalesce bursts (progress of many hosts) into one event.
        tokio::time::sleep(Duration::from_millis(50)).await;
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
</style></head><body>
<h1>patchbook watch</h1>
<div id="gen">connecting…</div>
<h2>Last reload error</h2><div id="err"></div>
<h2>Run in flight</h2><div id="runs"></div>
<h2>Scheduled runs</h2><div id="sched"></div>
<h2>Recent runs</h2><div id="recent"></div>
<h2>Files</h2><div id="files"></div>
<script>
const esc=s=>String(s??'').replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));
const table=(cols,rows)=>rows.length?'<table><tr>'+cols.map(c=>'<th>'+esc(c)+'</th>').join('')+'</tr>'+rows.map(r=>'<tr>'+r.map(v=>'<td>'+v+'</td>').join('')+'</tr>').join('')+'</table>':'<p>none</p>';
function render(s){
  const g=s.generation;
  document.getElementById('gen').innerHTML=g?`Generation <b>${g.number}</b> live since ${esc(g.created)} · ${g.playbooks.length} playbooks · inputs <code>${esc(g.input_hash.slice(0,16))}</code> · clock ${esc(s.now)}${s.stopping?' · <b class="bad">stopping</b>':''}`:'<b class="bad">no generation live</b>';
  const e=s.last_error;
  document.getElementById('err').innerHTML=e?e.errors.map(x=>`<pre>${esc(x.message)}</pre>`).join(''):'<p class="ok">none</p>';
  const p=r=>`${r.progress.targeted} targeted, ${r.progress.done} done, ${r.progress.in_progress} in progress, ${r.progress.failed} failed, ${r.progress.pending} pending`;
  document.getElementById('runs').innerHTML=table(['playbook','run','generation','sha256','progress'],s.runs.in_flight.map(r=>[esc(r.playbook),esc(r.run_id),r.generation,'<code>'+esc(r.sha256.slice(0,16))+'</code>',p(r)]));
  document.getElementById('sched').innerHTML=table(['playbook','schedule','next start','skipped (overlap)'],s.schedules.map(x=>[esc(x.playbook),esc(x.spec),esc(x.next_start_local??x.next_start),x.skipped_overlaps]));
  document.getElementById('recent').innerHTML=table(['playbook','run','generation','ok','summary'],s.runs.recent.map(r=>[esc(r.playbook),esc(r.run_id),r.generation,r.ok?'<span class="ok">yes</span>':'<span class="bad">no</span>',esc(r.summary)]));
  document.getElementById('files').innerHTML=g?table(['file','kind','sha256'],g.files.map(f=>[esc(f.path),esc(f.kind),'<code>'+esc(f.sha256)+'</code>'])):'';
}
fetch('status.json').then(r=>r.json()).then(render);
const es=new EventSource('events');es.addEventListener('status',ev=>render(JSON.parse(ev.data)));
</script></body></html>
"#;
