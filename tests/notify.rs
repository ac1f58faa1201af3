//! Notifications against real receivers on loopback: an HTTP server (tiny_http),
//! an SMTP server (aiosmtpd from the CI venv, see `tests/smtp_sink.py`) and a
//! real program reading its stdin. Every server is stopped by a Drop guard.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use patchbook::config::Config;
use patchbook::primitives::notify::{
    automatic, notify, send, BudgetExhausted, Delivery, FirstFailure, NotifyConfig, RunFinished,
    RunSummary, Severity,
};
use serde_json::Value;

#[path = "support/smtp.rs"]
mod smtp;
use smtp::SmtpSink;

// ---------------------------------------------------------------------------
// Receivers

#[derive(Debug, Clone)]
struct Request {
    method: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).expect("webhook body is JSON")
    }
}

/// A webhook receiver answering from a script of statuses, then 200.
struct HttpSink {
    port: u16,
    requests: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HttpSink {
    fn start(script: Vec<(u16, String)>) -> Self {
        let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let port = server.server_addr().to_ip().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (reqs, halt) = (requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut script: VecDeque<(u16, String)> = script.into();
            while !halt.load(Ordering::SeqCst) {
                let Ok(Some(mut rq)) = server.recv_timeout(Duration::from_millis(50)) else {
                    continue;
                };
                let mut body = String::new();
                rq.as_reader().read_to_string(&mut body).unwrap();
                reqs.lock().unwrap().push(Request {
                    method: rq.method().to_string(),
                    headers: rq
                        .headers()
                        .iter()
                        .map(|h| (h.field.to_string(), h.value.to_string()))
                        .collect(),
                    body,
                });
                let (code, reply) = script.pop_front().unwrap_or((200, "ok".into()));
                let _ = rq.respond(tiny_http::Response::from_string(reply).with_status_code(code));
            }
        });
        HttpSink {
            port,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook/T000", self.port)
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for HttpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A loopback port that refuses connections and stays refused: the socket is
/// bound (so no one else gets the port) but never listens.
fn closed_port() -> (socket2::Socket, u16) {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let port = sock.local_addr().unwrap().as_socket().unwrap().port();
    (sock, port)
}

/// Captures every tracing line, including those logged on delivery threads.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
    fn capture<T>(&self, f: impl FnOnce() -> T) -> T {
        let logs = self.clone();
        let sub = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || logs.clone())
            .finish();
        tracing::subscriber::with_default(sub, f)
    }
}

/// Loads `[notify]` through the real config loader, from a file.
fn load(dir: &Path, toml: &str) -> NotifyConfig {
    let path = dir.join("patchbook.toml");
    std::fs::write(&path, toml).unwrap();
    let cfg = Config::load(&path).unwrap();
    cfg.notify.check().unwrap();
    cfg.notify
}

fn write_script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn one(d: &[Delivery], to: &str) -> Delivery {
    d.iter()
        .find(|d| d.to == to)
        .unwrap_or_else(|| panic!("no delivery to {to} in {d:?}"))
        .clone()
}

// ---------------------------------------------------------------------------
// Channels

#[test]
fn webhook_posts_slack_text_severity_and_configured_headers() {
    let http = HttpSink::start(vec![]);
    let dir = tempfile::tempdir().unwrap();
    std::env::set_var("PB_TEST_WEBHOOK_TOKEN", "hook-token-1");
    let cfg = load(
        dir.path(),
        &format!(
            r#"
[notify]
retries = 0
[notify.channels.ops-chat]
type = "webhook"
url = "{}"
headers = {{ Authorization = "Bearer ${{env:PB_TEST_WEBHOOK_TOKEN}}", X-Team = "ops" }}
"#,
            http.url()
        ),
    );
    let d = notify(
        &cfg,
        &["ops-chat".into()],
        "Patching 12 hosts tonight\nwindow Sat 02:00-06:00",
        Severity::Critical,
        &[],
    );
    assert_eq!(
        d,
        vec![Delivery {
            channel: "ops-chat".into(),
            to: "ops-chat".into(),
            ok: true,
            attempts: 1,
            error: None
        }]
    );
    let reqs = http.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.method, "POST");
    assert!(r
        .header("Content-Type")
        .unwrap()
        .starts_with("application/json"));
    assert_eq!(r.header("Authorization"), Some("Bearer hook-token-1"));
    assert_eq!(r.header("X-Team"), Some("ops"));
    let body = r.json();
    assert_eq!(
        body["text"],
        "Patching 12 hosts tonight\nwindow Sat 02:00-06:00"
    );
    assert_eq!(body["severity"], "critical");
    assert_eq!(body["source"], "patchbook");
    assert_eq!(body["channel"], "ops-chat");
}

#[test]
fn automatic_run_finished_carries_summary_fields_to_the_webhook() {
    let http = HttpSink::start(vec![]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = load(
        dir.path(),
        &format!(
            r#"
[notify]
to = ["ops-chat"]
events = ["run_finished"]
[notify.channels.ops-chat]
type = "webhook"
url = "{}"
"#,
            http.url()
        ),
    );
    let finished = RunFinished {
        run: "20250301-0200".into(),
        summary: RunSummary {
            targeted: 30,
            patched: 27,
            failed: 2,
            rolled_back: 1,
            ..Default::default()
        },
        report: Some(".patchbook/reports/20250301-0200.html".into()),
        duration: Some(Duration::from_secs(3700)),
    };
    let d = automatic(&cfg, &finished.notice(), &["owner@example.com".into()], &[]);
    assert_eq!(d.len(), 1, "run_finished is not an escalation: {d:?}");
    assert!(d[0].ok, "{d:?}");
    // Disabled event: nothing is sent at all.
    let budget = BudgetExhausted {
        run: "20250301-0200".into(),
        failed_hosts: vec!["a".into()],
        unreachable: false,
        targets: 30,
        budget: "1".into(),
        action: None,
    };
    assert!(automatic(&cfg, &budget.notice(), &[], &[]).is_empty());

    let reqs = http.requests();
    assert_eq!(reqs.len(), 1);
    let body = reqs[0].json();
    assert_eq!(body["event"], "run_finished");
    assert_eq!(body["severity"], "warning");
    assert_eq!(body["fields"]["patched"], 27);
    assert_eq!(body["fields"]["failed"], 2);
    assert_eq!(
        body["fields"]["report"],
        ".patchbook/reports/20250301-0200.html"
    );
    let text = body["text"].as_str().unwrap();
    assert!(
        text.contains("finished after 1h01m: 30 targeted, 27 patched, 2 failed, 1 rolled back"),
        "{text}"
    );
    assert!(
        text.contains("Report: .patchbook/reports/20250301-0200.html"),
        "{text}"
    );
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "needs aiosmtpd from the CI venv: cargo test --features lab after .ci/setup, as .ci/run does"
)]
fn smtp_reaches_contacts_and_channel_recipients() {
    let smtp = SmtpSink::start(None);
    let dir = tempfile::tempdir().unwrap();
    let cfg = load(
        dir.path(),
        &format!(
            r#"
[notify]
contacts_channel = "ops-mail"
contacts = {{ db-team = "db@example.com" }}
retries = 1
backoff = "20ms"
[notify.channels.ops-mail]
type = "smtp"
server = "127.0.0.1"
port = {}
starttls = false
from = "patchbook@example.com"
to = ["ops@example.com", "noc@example.com"]
"#,
            smtp.port
        ),
    );
    let d = notify(
        &cfg,
        &["alice@example.com".into()],
        "Patching web01 tonight\nExpect a restart of acme-agent.",
        Severity::Warning,
        &[],
    );
    assert!(d[0].ok, "{d:?}");
    assert_eq!(d[0].channel, "ops-mail");
    let mails = smtp.wait_for(1);
    assert_eq!(mails.len(), 1);
    let m = &mails[0];
    assert_eq!(m.rcpt_tos, vec!["alice@example.com"]);
    assert!(!m.tls);
    assert_eq!(m.subject, "[patchbook warning] Patching web01 tonight");
    assert_eq!(m.from, "patchbook@example.com");
    assert_eq!(m.to, "alice@example.com");
    assert_eq!(
        m.body.trim_end(),
        "Patching web01 tonight\nExpect a restart of acme-agent."
    );

    // The channel by name mails its own list; a contact name maps to its address.
    let d = notify(
        &cfg,
        &["ops-mail".into(), "db-team".into()],
        "second",
        Severity::Info,
        &[],
    );
    assert!(d.iter().all(|d| d.ok), "{d:?}");
    let mails = smtp.wait_for(3);
    assert_eq!(mails.len(), 3);
    let mut rcpts: Vec<Vec<String>> = mails[1..].iter().map(|m| m.rcpt_tos.clone()).collect();
    rcpts.sort();
    assert_eq!(
        rcpts,
        vec![
            vec!["db@example.com".to_string()],
            vec!["ops@example.com".to_string(), "noc@example.com".to_string()],
        ]
    );
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "needs aiosmtpd from the CI venv: cargo test --features lab after .ci/setup, as .ci/run does"
)]
fn first_failure_escalates_to_the_hosts_owners_by_mail() {
    let smtp = SmtpSink::start(None);
    let http = HttpSink::start(vec![]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = load(
        dir.path(),
        &format!(
            r#"
[notify]
contacts_channel = "mail"
to = ["chat"]
[notify.channels.mail]
type = "smtp"
server = "127.0.0.1"
port = {}
from = "patchbook@example.com"
[notify.channels.chat]
type = "webhook"
url = "{}"
"#,
            smtp.port,
            http.url()
        ),
    );
    let failure = FirstFailure {
        run: "r7".into(),
        host: "db01".into(),
        step: Some("verify".into()),
        reason: "acme-agent is 1.0.0 after install, wanted 1.0.1".into(),
        action: Some("rolled back".into()),
    };
    let d = automatic(
        &cfg,
        &failure.notice(),
        &["dba@example.com".into(), "lead@example.com".into()],
        &[],
    );
    assert_eq!(d.len(), 3, "{d:?}");
    assert!(d.iter().all(|d| d.ok), "{d:?}");
    let mails = smtp.wait_for(2);
    let mut rcpts: Vec<String> = mails.iter().map(|m| m.rcpt_tos[0].clone()).collect();
    rcpts.sort();
    assert_eq!(rcpts, vec!["dba@example.com", "lead@example.com"]);
    for m in &mails {
        assert_eq!(
            m.subject,
            "[patchbook warning] patchbook run r7: first failure on db01 at verify: \
             acme-agent is 1.0.0 after install, wanted 1.0.1"
        );
        assert!(
            m.body.contains("The host is being rolled back."),
            "{}",
            m.body
        );
        assert!(m.body.contains("\nhost: db01\n"), "{}", m.body);
    }
    let body = http.requests()[0].json();
    assert_eq!(body["event"], "first_failure");
    assert_eq!(body["fields"]["host"], "db01");
}

#[test]
fn command_gets_the_message_on_stdin_and_placeholders_in_argv() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("stdin.txt");
    let args = dir.path().join("args.txt");
    let page = write_script(
        dir.path(),
        "page-oncall",
        "#!/bin/sh\nprintf '%s\\n' \"$@\" > \"$PB_ARGS\"\ncat > \"$PB_OUT\"\n",
    );
    // The script learns its output paths from argv, not the environment.
    let page = write_script(
        dir.path(),
        "page",
        &format!(
            "#!/bin/sh\nPB_ARGS={} PB_OUT={} exec {} \"$@\"\n",
            args.display(),
            out.display(),
            page.display()
        ),
    );
    let cfg = load(
        dir.path(),
        &format!(
            r#"
[notify.channels.pager]
type = "command"
argv = ["{}", "--severity", "{{severity}}", "--event", "{{event}}", "a b; rm -rf /"]
"#,
            page.display()
        ),
    );
    let d = notify(
        &cfg,
        &["pager".into()],
        "db01 failed $(reboot) `id`",
        Severity::Critical,
        &[],
    );
    assert!(d[0].ok, "{d:?}");
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "db01 failed $(reboot) `id`\n"
    );
    assert_eq!(
        std::fs::read_to_string(&args).unwrap(),
        "--severity\ncritical\n--event\nmessage\na b; rm -rf /\n"
    );
}

// ---------------------------------------------------------------------------
// Failure handling

#[test]
fn http_500_is_retried_with_backoff_then_delivered() {
    let http = HttpSink::start(vec![(500, "busy".into()), (503, "still busy".into())]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = load(
        dir.path(),
        &format!(
            "[notify]\nretries = 3\nbackoff = \"100ms\"\n[notify.channels.chat]\ntype = \"webhook\"\nurl = \"{}\"\n",
            http.url()
        ),
    );
    let logs = Logs::default();
    let started = Instant::now();
    let d = logs.capture(|| notify(&cfg, &["chat".into()], "hello", Severity::Info, &[]));
    let took = started.elapsed();
    assert!(d[0].ok, "{d:?}");
    assert_eq!(d[0].attempts, 3);
    assert_eq!(d[0].error, None);
    assert_eq!(http.requests().len(), 3);
    // 100 ms, then 200 ms: the backoff doubles.
    assert!(took >= Duration::from_millis(300), "took {took:?}");
    let text = logs.text();
    assert!(text.contains("HTTP 500"), "{text}");
    assert!(text.contains("HTTP 503"), "{text}");
    assert!(text.contains("notification delivered"), "{text}");
}

#[test]
fn unreachable_channels_fail_their_delivery_but_not_the_call() {
    let (_closed_socket, closed) = closed_port();
    let http = HttpSink::start(vec![(401, "bad token".into())]);
    let dir = tempfile::tempdir().unwrap();
    let fail = write_script(
        dir.path(),
        "fail",
        "#!/bin/sh\necho 'pager down' >&2\nexit 3\n",
    );
    let cfg = load(
        dir.path(),
        &format!(
            r#"
[notify]
retries = 2
backoff = "30ms"
timeout = "3s"
contacts_channel = "mail"
[notify.channels.dead-hook]
type = "webhook"
url = "http://127.0.0.1:{closed}/x"
[notify.channels.auth-hook]
type = "webhook"
url = "{}"
[notify.channels.mail]
type = "smtp"
server = "127.0.0.1"
port = {closed}
from = "patchbook@example.com"
[notify.channels.pager]
type = "command"
argv = ["{}"]
[notify.channels.missing]
type = "command"
argv = ["/nonexistent/page-oncall"]
"#,
            http.url(),
            fail.display()
        ),
    );
    let logs = Logs::default();
    let started = Instant::now();
    let d = logs.capture(|| {
        notify(
            &cfg,
            &[
                "dead-hook".into(),
                "auth-hook".into(),
                "someone@example.com".into(),
                "pager".into(),
                "missing".into(),
                "nobody".into(),
            ],
            "hello",
            Severity::Warning,
            &[],
        )
    });
    assert_eq!(d.len(), 6);
    assert!(d.iter().all(|d| !d.ok), "{d:?}");

    let dead = one(&d, "dead-hook");
    assert_eq!(dead.attempts, 3);
    assert!(
        dead.error
            .as_deref()
            .unwrap()
            .contains("webhook unreachable"),
        "{dead:?}"
    );
    // The URL may carry a token, so it is never part of the error.
    assert!(
        !dead.error.as_deref().unwrap().contains("127.0.0.1"),
        "{dead:?}"
    );

    let auth = one(&d, "auth-hook");
    assert_eq!(auth.attempts, 1, "a 401 does not heal by retrying");
    assert!(
        auth.error.as_deref().unwrap().contains("HTTP 401"),
        "{auth:?}"
    );
    assert!(
        auth.error.as_deref().unwrap().contains("bad token"),
        "{auth:?}"
    );

    let mail = one(&d, "someone@example.com");
    assert_eq!(mail.channel, "mail");
    assert_eq!(mail.attempts, 3);
    assert!(
        mail.error.as_deref().unwrap().starts_with("smtp:"),
        "{mail:?}"
    );

    let pager = one(&d, "pager");
    assert_eq!(pager.attempts, 3);
    assert!(
        pager
            .error
            .as_deref()
            .unwrap()
            .contains("exited with 3: pager down"),
        "{pager:?}"
    );

    let missing = one(&d, "missing");
    assert_eq!(missing.attempts, 1, "{missing:?}");
    assert!(
        missing.error.as_deref().unwrap().contains("cannot start"),
        "{missing:?}"
    );

    let nobody = one(&d, "nobody");
    assert_eq!(nobody.attempts, 0);
    assert_eq!(nobody.channel, "");

    // Deliveries run side by side: the whole call takes about one channel's
    // retries (30 + 60 ms of backoff), not the sum over all channels.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let text = logs.text();
    assert!(text.contains("retrying in 30ms"), "{text}");
    assert!(
        text.contains("notification failed after every retry"),
        "{text}"
    );

    // The record the journal stores.
    let json = serde_json::to_value(&pager).unwrap();
    assert_eq!(json["channel"], "pager");
    assert_eq!(json["ok"], false);
    assert_eq!(json["attempts"], 3);
}

#[test]
fn command_past_its_deadline_is_stopped_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let slow = write_script(dir.path(), "slow", "#!/bin/sh\nsleep 30\n");
    let cfg = load(
        dir.path(),
        &format!(
            "[notify]\nretries = 0\n[notify.channels.slow]\ntype = \"command\"\nargv = [\"{}\"]\ntimeout = \"300ms\"\n",
            slow.display()
        ),
    );
    let started = Instant::now();
    let d = notify(&cfg, &["slow".into()], "x", Severity::Info, &[]);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(!d[0].ok);
    assert!(d[0].error.as_deref().unwrap().contains("deadline"), "{d:?}");
}

#[test]
fn bad_notify_config_names_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("patchbook.toml");
    std::fs::write(
        &path,
        "forks = 4\n\n[notify.channels.chat]\ntype = \"webhook\"\nurl = \"https://x\"\nheadrs = {}\n",
    )
    .unwrap();
    let e = Config::load(&path).unwrap_err().to_string();
    assert!(e.contains("patchbook.toml:"), "{e}");
    assert!(e.contains("headrs"), "{e}");
    // Channel tables are read whole (their `type` picks the kind), so the
    // position is the table's own line.
    assert!(
        e.contains("patchbook.toml:3:1: unknown field `headrs`"),
        "{e}"
    );
    std::fs::write(&path, "[notify]\nbackoff = \"soon\"\n").unwrap();
    let e = Config::load(&path).unwrap_err().to_string();
    assert!(
        e.contains("patchbook.toml:2:11: `soon` is not a duration"),
        "{e}"
    );
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "needs aiosmtpd from the CI venv: cargo test --features lab after .ci/setup, as .ci/run does"
)]
fn many_owners_each_get_their_own_mail_and_record_in_order() {
    let smtp = SmtpSink::start(None);
    let dir = tempfile::tempdir().unwrap();
    let cfg = load(
        dir.path(),
        &format!(
            "[notify]\ncontacts_channel = \"mail\"\n[notify.channels.mail]\ntype = \"smtp\"\n\
             server = \"127.0.0.1\"\nport = {}\nfrom = \"patchbook@example.com\"\n",
            smtp.port
        ),
    );
    let owners: Vec<String> = (0..20)
        .map(|i| format!("owner{i:02}@example.com"))
        .collect();
    let d = notify(&cfg, &owners, "maintenance tonight", Severity::Info, &[]);
    let to: Vec<&str> = d.iter().map(|d| d.to.as_str()).collect();
    assert_eq!(to, owners.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(d.iter().all(|d| d.ok && d.attempts == 1), "{d:?}");
    let mails = smtp.wait_for(20);
    let mut got: Vec<String> = mails.iter().map(|m| m.rcpt_tos.join(",")).collect();
    got.sort();
    assert_eq!(got, owners);
}

// ---------------------------------------------------------------------------
// STARTTLS

struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// A throwaway CA and a server certificate for 127.0.0.1, made with openssl.
fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap_or_else(|e| {
                panic!("openssl is needed for the STARTTLS test ({e}); run .ci/setup")
            });
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=patchbook test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "srv.key",
        "-out",
        "srv.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(p("ext.cnf"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "srv.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "srv.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    Pki {
        ca: p("ca.pem"),
        cert: p("srv.pem"),
        key: p("srv.key"),
        _dir: dir,
    }
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "needs aiosmtpd from the CI venv: cargo test --features lab after .ci/setup, as .ci/run does"
)]
fn starttls_required_upgrades_or_refuses_to_send() {
    let pki = pki();
    let tls_sink = SmtpSink::start(Some((&pki.cert, &pki.key)));
    let plain_sink = SmtpSink::start(None);
    let dir = tempfile::tempdir().unwrap();
    let cfg = load(
        dir.path(),
        &format!(
            r#"
[notify]
retries = 0
[notify.channels.secure]
type = "smtp"
server = "127.0.0.1"
port = {}
starttls = true
ca_file = "{}"
from = "patchbook@example.com"
to = ["ops@example.com"]
[notify.channels.downgraded]
type = "smtp"
server = "127.0.0.1"
port = {}
starttls = "required"
from = "patchbook@example.com"
to = ["ops@example.com"]
"#,
            tls_sink.port,
            pki.ca.display(),
            plain_sink.port
        ),
    );
    let d = notify(
        &cfg,
        &["secure".into(), "downgraded".into()],
        "over TLS",
        Severity::Info,
        &[],
    );
    let secure = one(&d, "secure");
    assert!(secure.ok, "{secure:?}");
    let mails = tls_sink.wait_for(1);
    assert_eq!(mails.len(), 1);
    assert!(mails[0].tls, "the mail travelled after STARTTLS");
    assert_eq!(mails[0].body.trim_end(), "over TLS");

    let down = one(&d, "downgraded");
    assert!(!down.ok, "{down:?}");
    assert!(
        plain_sink.mails().is_empty(),
        "nothing is sent in the clear"
    );
}

// ---------------------------------------------------------------------------
// Secrets

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "needs aiosmtpd from the CI venv: cargo test --features lab after .ci/setup, as .ci/run does"
)]
fn canary_secrets_never_reach_receivers_logs_or_delivery_errors() {
    const CANARY: &str = "canary-7f3a9c-secret";
    const HEADER_TOKEN: &str = "hdr-token-51e0d2";
    std::env::set_var("PB_TEST_CANARY_HEADER_TOKEN", HEADER_TOKEN);

    // The receiver echoes the secrets back in an error reply, as a misbehaving
    // service might; that reply goes into the delivery error and the log.
    let http = HttpSink::start(vec![(
        500,
        format!("rejected {CANARY} with Bearer {HEADER_TOKEN}"),
    )]);
    let smtp = SmtpSink::start(None);
    let dir = tempfile::tempdir().unwrap();
    let stdin_copy = dir.path().join("stdin.txt");
    let cmd = write_script(
        dir.path(),
        "pager",
        &format!(
            "#!/bin/sh\ncat >> {}\necho \"$1\" >> {}\n",
            stdin_copy.display(),
            stdin_copy.display()
        ),
    );
    let cfg = load(
        dir.path(),
        &format!(
            r#"
[notify]
contacts_channel = "mail"
retries = 1
backoff = "10ms"
[notify.channels.chat]
type = "webhook"
url = "{}"
headers = {{ Authorization = "Bearer ${{env:PB_TEST_CANARY_HEADER_TOKEN}}" }}
[notify.channels.mail]
type = "smtp"
server = "127.0.0.1"
port = {}
from = "patchbook@example.com"
[notify.channels.pager]
type = "command"
argv = ["{}", "{{severity}}"]
stdin = "json"
"#,
            http.url(),
            smtp.port,
            cmd.display()
        ),
    );
    // The message carries the canary and, by mistake, the header's token too.
    let message = format!("deploy failed: password={CANARY} token={HEADER_TOKEN}");
    let redact = vec![CANARY.to_string()];
    let logs = Logs::default();
    let failure = FirstFailure {
        run: "r1".into(),
        host: "db01".into(),
        step: None,
        reason: format!("login with {CANARY} refused"),
        action: None,
    };
    let (d1, d2) = logs.capture(|| {
        let d1 = notify(
            &cfg,
            &["chat".into(), "ops@example.com".into(), "pager".into()],
            &message,
            Severity::Critical,
            &redact,
        );
        let d2 = send(
            &cfg,
            &["chat".into(), "pager".into()],
            &failure.notice(),
            &redact,
        );
        (d1, d2)
    });
    assert!(d1.iter().chain(d2.iter()).all(|d| d.ok), "{d1:?} {d2:?}");
    assert_eq!(one(&d1, "chat").attempts, 2, "the 500 was retried");

    let mut exposed: Vec<(String, String)> = Vec::new();
    let reqs = http.requests();
    assert_eq!(reqs.len(), 3);
    for r in &reqs {
        exposed.push(("webhook body".into(), r.body.clone()));
        for (k, v) in &r.headers {
            if !k.eq_ignore_ascii_case("Authorization") {
                exposed.push((format!("webhook header {k}"), v.clone()));
            }
        }
        // The token is sent where it belongs, and only there.
        assert_eq!(
            r.header("Authorization"),
            Some(format!("Bearer {HEADER_TOKEN}").as_str())
        );
        assert!(r.json()["text"].as_str().unwrap().contains("***"));
    }
    let mails = smtp.wait_for(1);
    assert_eq!(mails.len(), 1);
    assert!(
        mails[0].body.contains("password=*** token=***"),
        "{}",
        mails[0].body
    );
    for m in &mails {
        exposed.push(("raw mail".into(), m.data.clone()));
        exposed.push(("mail subject".into(), m.subject.clone()));
        exposed.push(("mail body".into(), m.body.clone()));
    }
    let stdin = std::fs::read_to_string(&stdin_copy).unwrap();
    assert!(stdin.contains("password=*** token=***"), "{stdin}");
    assert!(stdin.contains("login with *** refused"), "{stdin}");
    exposed.push(("command stdin".into(), stdin));
    exposed.push(("logs".into(), logs.text()));
    exposed.push((
        "deliveries".into(),
        serde_json::to_string(&(d1, d2)).unwrap(),
    ));
    // The first attempt's error (with the echoed secrets) was logged, redacted.
    assert!(logs.text().contains("HTTP 500"), "{}", logs.text());
    assert!(
        logs.text().contains("rejected *** with Bearer ***"),
        "{}",
        logs.text()
    );

    for (place, text) in &exposed {
        for secret in [CANARY, HEADER_TOKEN] {
            assert!(
                !text.contains(secret),
                "{secret} leaked into {place}: {text}"
            );
        }
    }
}
