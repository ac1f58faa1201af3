//! Notifications: telling people about a run through the channels named in
//! `patchbook.toml` (`webhook`, `smtp`, `command`), and the texts of the automatic
//! notifications (run started, first failure, budget exhausted, run finished).
//!
//! It owns the checks of the channel configuration (whose plain data is
//! `config::notify`, re-exported here), recipient resolution (channel names,
//! contacts, e-mail addresses), delivery with retries and backoff, and secret
//! redaction on every byte that leaves the controller. A failing channel never
//! fails the caller: every outcome comes back as a [`Delivery`] record. It must not
//! write the journal (the caller records the deliveries), know Rhai, or decide when
//! a run is over.
//!
//! Secrets in channel settings are referenced, never written inline:
//! `${env:NAME}` reads an environment variable and `${file:PATH}` a file's first
//! line at delivery time. Every value read this way, and every SMTP password, joins
//! the redaction list, so it shows as `***` in messages, logs and delivery errors.

use std::fmt;
use std::io::Read as _;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{Message, SmtpTransport, Transport as _};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

// The `[notify]` settings are plain data in `config`; this module gives them
// behaviour (`NotifyConfig::check`, `secrets`, routing) and delivers.
pub use crate::config::notify::{
    Channel, CommandChannel, Event, NotifyConfig, SmtpChannel, StartTls, StdinFormat,
    WebhookChannel,
};
use crate::journal::redact_str;
use crate::transport::local::LocalTransport;
use crate::transport::{Command, Transport as _, TransportError};

/// Longest wait between two attempts, however many retries are configured.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Most host names spelled out in one notification; the rest are counted.
const MAX_LISTED_HOSTS: usize = 10;
/// Most characters of a delivery error, counted after redaction so a cut can
/// never leave a secret's prefix behind.
const MAX_ERROR_CHARS: usize = 400;
/// Most bytes of a webhook's error reply read.
const MAX_REPLY_BYTES: u64 = 16 * 1024;
/// Deliveries in flight at once; a notice to hundreds of owners queues.
const MAX_PARALLEL_DELIVERIES: usize = 8;

/// How urgent a notification is. Webhooks get it as `severity`, mails in the
/// subject, commands through the `{severity}` placeholder.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    #[default]
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Severity {
    type Err = NotifyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "info" => Ok(Severity::Info),
            "warning" | "warn" => Ok(Severity::Warning),
            "critical" | "crit" => Ok(Severity::Critical),
            _ => Err(NotifyError::Severity(s.to_string())),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("unknown severity `{0}`: use info, warning or critical")]
    Severity(String),
    #[error("patchbook.toml [notify]: {0}")]
    Config(String),
}

/// What one notification says. Templates build it; [`send`] delivers it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Notice {
    pub text: String,
    pub severity: Severity,
    /// Set for the automatic notifications.
    pub event: Option<Event>,
    /// Structured facts (run id, counts, host) for receivers that parse them.
    pub fields: Map<String, Value>,
}

impl Notice {
    pub fn new(text: impl Into<String>, severity: Severity) -> Self {
        Notice {
            text: text.into(),
            severity,
            event: None,
            fields: Map::new(),
        }
    }

    pub fn field(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.fields.insert(key.to_string(), value.into());
        self
    }

    /// The first line, for mail subjects.
    pub fn headline(&self) -> &str {
        self.text.lines().next().unwrap_or("").trim()
    }
}

/// The outcome of one notification to one addressee; the journal records these
/// (`notify` records), so the type is the journal's.
pub use crate::journal::entry::Delivery;

/// Sends `message` to every entry of `to` (channel names, contacts or e-mail
/// addresses) and reports one [`Delivery`] per distinct entry. Never fails and
/// never panics on a channel's behalf; `redact` values show as `***`.
pub fn notify(
    cfg: &NotifyConfig,
    to: &[String],
    message: &str,
    severity: Severity,
    redact: &[String],
) -> Vec<Delivery> {
    send(cfg, to, &Notice::new(message, severity), redact)
}

/// An automatic notification: sent to `[notify] to`, plus `owners` for
/// escalations, and only when its event is enabled in `[notify] events`.
pub fn automatic(
    cfg: &NotifyConfig,
    notice: &Notice,
    owners: &[String],
    redact: &[String],
) -> Vec<Delivery> {
    let Some(event) = notice.event else {
        return send(cfg, &cfg.to, notice, redact);
    };
    if !cfg.events.contains(&event) {
        return Vec::new();
    }
    let mut to = cfg.to.clone();
    if event.is_escalation() {
        to.extend(owners.iter().cloned());
    }
    send(cfg, &to, notice, redact)
}

/// Delivers a [`Notice`] to every distinct entry of `to`, several at a time, each
/// with its own retries, so one slow channel does not hold up the others.
pub fn send(
    cfg: &NotifyConfig,
    to: &[String],
    notice: &Notice,
    redact: &[String],
) -> Vec<Delivery> {
    let mut seen = Vec::new();
    for t in to {
        let t = t.trim();
        if !t.is_empty() && !seen.iter().any(|s: &String| s == t) {
            seen.push(t.to_string());
        }
    }
    // A secret referenced by any channel is redacted on every channel.
    let mut secrets: Vec<String> = redact.iter().filter(|s| !s.is_empty()).cloned().collect();
    for s in cfg.secrets() {
        remember(&mut secrets, &s);
    }
    // Longest first: a secret that contains a shorter one is hidden whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let redact = secrets.as_slice();
    // Worker threads log into the caller's subscriber, so their lines are not lost.
    let dispatch = tracing::dispatcher::get_default(|d| d.clone());
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Delivery>>> = Mutex::new(vec![None; seen.len()]);
    std::thread::scope(|scope| {
        for _ in 0..seen.len().min(MAX_PARALLEL_DELIVERIES) {
            let dispatch = dispatch.clone();
            let (next, results, seen) = (&next, &results, &seen);
            scope.spawn(move || {
                tracing::dispatcher::with_default(&dispatch, || loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(addressee) = seen.get(i) else { break };
                    let d = deliver(cfg, addressee, notice, redact);
                    results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(d);
                })
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .zip(seen)
        .map(|(d, addressee)| {
            d.unwrap_or_else(|| Delivery {
                channel: String::new(),
                to: addressee,
                ok: false,
                attempts: 0,
                error: Some("delivery stopped unexpectedly; see the log".into()),
            })
        })
        .collect()
}

impl NotifyConfig {
    /// Checks what serde cannot: cross references between channels and contacts,
    /// addresses, and empty argv. Call it once when the config is loaded.
    pub fn check(&self) -> Result<(), NotifyError> {
        if let Some(name) = &self.contacts_channel {
            match self.channels.get(name) {
                Some(Channel::Smtp(_)) => {}
                Some(other) => {
                    return Err(NotifyError::Config(format!(
                        "contacts_channel = \"{name}\" is a {} channel; it must name an smtp channel",
                        other.kind()
                    )))
                }
                None => {
                    return Err(NotifyError::Config(format!(
                        "contacts_channel = \"{name}\" names no channel; add [notify.channels.{name}] with type = \"smtp\""
                    )))
                }
            }
        }
        for (name, ch) in &self.channels {
            match ch {
                Channel::Webhook(w) => {
                    if !w.url.starts_with("${")
                        && !w.url.starts_with("http://")
                        && !w.url.starts_with("https://")
                    {
                        return Err(NotifyError::Config(format!(
                            "[notify.channels.{name}] url must start with https:// (or http:// for a local receiver)"
                        )));
                    }
                }
                Channel::Smtp(s) => {
                    for addr in std::iter::once(&s.from).chain(s.to.iter()) {
                        if addr.parse::<Mailbox>().is_err() {
                            return Err(NotifyError::Config(format!(
                                "[notify.channels.{name}] `{addr}` is not an e-mail address"
                            )));
                        }
                    }
                }
                Channel::Command(c) => {
                    if c.argv.is_empty() {
                        return Err(NotifyError::Config(format!(
                            "[notify.channels.{name}] argv is empty; name the program to run"
                        )));
                    }
                }
            }
        }
        for (contact, target) in &self.contacts {
            if !self.channels.contains_key(target) && target.parse::<Mailbox>().is_err() {
                return Err(NotifyError::Config(format!(
                    "[notify.contacts] {contact} = \"{target}\" is neither a channel nor an e-mail address"
                )));
            }
        }
        for t in &self.to {
            self.route(t).map_err(NotifyError::Config)?;
        }
        Ok(())
    }

    /// Every secret value the channels reference (resolvable ones) plus every
    /// SMTP password, for the caller's redaction list (journal, logs, reports).
    pub fn secrets(&self) -> Vec<String> {
        let mut out = Vec::new();
        for ch in self.channels.values() {
            let refs: Vec<&String> = match ch {
                Channel::Webhook(w) => std::iter::once(&w.url).chain(w.headers.values()).collect(),
                Channel::Smtp(s) => {
                    let mut v = vec![&s.server];
                    v.extend(s.username.iter());
                    v.extend(s.password.iter());
                    v
                }
                Channel::Command(c) => c.argv.iter().collect(),
            };
            for r in refs {
                let _ = expand(r, &mut out);
            }
            if let Channel::Smtp(SmtpChannel {
                password: Some(p), ..
            }) = ch
            {
                if let Ok(p) = expand(p, &mut Vec::new()) {
                    remember(&mut out, &p);
                }
            }
        }
        out
    }

    /// The channel and, for mail, the recipients an addressee resolves to.
    fn route(&self, addressee: &str) -> Result<Route<'_>, String> {
        let target = self
            .contacts
            .get(addressee)
            .map(String::as_str)
            .unwrap_or(addressee);
        if let Some((name, ch)) = self.channels.get_key_value(target) {
            return Ok(Route {
                name,
                channel: ch,
                recipients: None,
            });
        }
        let Ok(mailbox) = target.parse::<Mailbox>() else {
            return Err(format!(
                "`{addressee}` is neither a channel in [notify.channels] nor an e-mail address; \
                 add it to [notify.contacts] or correct the owner in the inventory"
            ));
        };
        let Some(name) = &self.contacts_channel else {
            return Err(format!(
                "`{addressee}` is an e-mail address but [notify] has no contacts_channel; \
                 set contacts_channel to an smtp channel"
            ));
        };
        match self.channels.get_key_value(name) {
            Some((name, ch @ Channel::Smtp(_))) => Ok(Route {
                name,
                channel: ch,
                recipients: Some(vec![mailbox]),
            }),
            _ => Err(format!(
                "contacts_channel = \"{name}\" is not an smtp channel in [notify.channels]"
            )),
        }
    }
}

struct Route<'a> {
    name: &'a str,
    channel: &'a Channel,
    recipients: Option<Vec<Mailbox>>,
}

/// Why one attempt failed, and whether another could succeed.
enum Failure {
    Retry(String),
    Permanent(String),
}

fn deliver(cfg: &NotifyConfig, addressee: &str, notice: &Notice, redact: &[String]) -> Delivery {
    let mut delivery = Delivery {
        channel: String::new(),
        to: addressee.to_string(),
        ok: false,
        attempts: 0,
        error: None,
    };
    let route = match cfg.route(addressee) {
        Ok(r) => r,
        Err(e) => {
            let e = shorten(redact_str(&e, redact));
            tracing::error!(to = %redact_str(addressee, redact), error = %e, "notification not sent");
            delivery.error = Some(e);
            return delivery;
        }
    };
    delivery.channel = route.name.to_string();
    let mut secrets = redact.to_vec();
    let prepared = match prepare(route.channel, &mut secrets) {
        Ok(p) => {
            secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
            p
        }
        Err(e) => {
            let e = shorten(redact_str(
                &format!("channel {}: {e}", route.name),
                &secrets,
            ));
            tracing::error!(channel = route.name, error = %e, "notification not sent");
            delivery.error = Some(e);
            return delivery;
        }
    };
    // Secrets read from the channel settings are redacted from the message too.
    let notice = Notice {
        text: redact_str(&notice.text, &secrets),
        fields: match crate::journal::redact_value(Value::Object(notice.fields.clone()), &secrets) {
            Value::Object(m) => m,
            _ => Map::new(),
        },
        ..notice.clone()
    };
    let attempts = cfg.retries.saturating_add(1);
    let mut wait = cfg.backoff;
    loop {
        delivery.attempts += 1;
        let outcome = attempt(
            cfg,
            route.name,
            &prepared,
            route.recipients.as_deref(),
            &notice,
        );
        match outcome {
            Ok(()) => {
                delivery.ok = true;
                delivery.error = None;
                tracing::info!(
                    channel = route.name,
                    to = %redact_str(addressee, &secrets),
                    attempts = delivery.attempts,
                    severity = %notice.severity,
                    "notification delivered"
                );
                return delivery;
            }
            Err(Failure::Permanent(e)) => {
                let e = shorten(redact_str(&e, &secrets));
                tracing::error!(channel = route.name, attempts = delivery.attempts, error = %e,
                    "notification failed; not retrying, the error will not go away by itself");
                delivery.error = Some(e);
                return delivery;
            }
            Err(Failure::Retry(e)) => {
                let e = shorten(redact_str(&e, &secrets));
                if delivery.attempts >= attempts {
                    tracing::error!(channel = route.name, attempts = delivery.attempts, error = %e,
                        "notification failed after every retry");
                    delivery.error = Some(e);
                    return delivery;
                }
                tracing::warn!(channel = route.name, attempt = delivery.attempts, error = %e,
                    "notification attempt failed; retrying in {:?}", wait);
                delivery.error = Some(e);
                std::thread::sleep(wait);
                wait = (wait * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// A channel with its secret references read, ready for attempts.
enum Prepared {
    Webhook {
        url: String,
        headers: Vec<(String, String)>,
        timeout: Option<Duration>,
    },
    Smtp {
        transport: SmtpTransport,
        from: Mailbox,
        to: Vec<Mailbox>,
    },
    Command {
        argv: Vec<String>,
        stdin: StdinFormat,
        timeout: Option<Duration>,
    },
}

fn prepare(ch: &Channel, secrets: &mut Vec<String>) -> Result<Prepared, String> {
    match ch {
        Channel::Webhook(w) => {
            let url = expand(&w.url, secrets)?;
            let headers = w
                .headers
                .iter()
                .map(|(k, v)| Ok((k.clone(), expand(v, secrets)?)))
                .collect::<Result<Vec<_>, String>>()?;
            Ok(Prepared::Webhook {
                url,
                headers,
                timeout: w.timeout,
            })
        }
        Channel::Smtp(s) => {
            let password = match &s.password {
                Some(p) => {
                    let p = expand(p, secrets)?;
                    remember(secrets, &p);
                    Some(p)
                }
                None => None,
            };
            let server = expand(&s.server, secrets)?;
            let from: Mailbox = s
                .from
                .parse()
                .map_err(|e| format!("from = \"{}\" is not an e-mail address: {e}", s.from))?;
            let to =
                s.to.iter()
                    .map(|a| {
                        a.parse::<Mailbox>()
                            .map_err(|e| format!("to: `{a}` is not an e-mail address: {e}"))
                    })
                    .collect::<Result<Vec<_>, String>>()?;
            let port = s.port.unwrap_or(match s.starttls {
                StartTls::Required => 587,
                _ => 25,
            });
            let tls = match s.starttls {
                StartTls::Off => Tls::None,
                StartTls::Opportunistic => Tls::Opportunistic(tls_parameters(&server, s)?),
                StartTls::Required => Tls::Required(tls_parameters(&server, s)?),
            };
            let mut builder = SmtpTransport::builder_dangerous(server.as_str())
                .port(port)
                .tls(tls)
                .timeout(s.timeout);
            if let Some(user) = &s.username {
                let user = expand(user, secrets)?;
                builder = builder.credentials(Credentials::new(user, password.unwrap_or_default()));
            }
            Ok(Prepared::Smtp {
                transport: builder.build(),
                from,
                to,
            })
        }
        Channel::Command(c) => {
            if c.argv.is_empty() {
                return Err("argv is empty; name the program to run".into());
            }
            Ok(Prepared::Command {
                argv: c.argv.clone(),
                stdin: c.stdin,
                timeout: c.timeout,
            })
        }
    }
}

fn tls_parameters(server: &str, s: &SmtpChannel) -> Result<TlsParameters, String> {
    let mut b = TlsParameters::builder(server.to_string());
    if let Some(path) = &s.ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| format!("cannot read ca_file {}: {e}", path.display()))?;
        let cert = lettre::transport::smtp::client::Certificate::from_pem(&pem)
            .map_err(|e| format!("ca_file {} is not a PEM certificate: {e}", path.display()))?;
        b = b.add_root_certificate(cert);
    }
    b.build()
        .map_err(|e| format!("cannot set up TLS for {server}: {e}"))
}

fn shorten(mut s: String) -> String {
    if let Some((cut, _)) = s.char_indices().nth(MAX_ERROR_CHARS) {
        s.truncate(cut);
        s.push('…');
    }
    s
}

fn remember(secrets: &mut Vec<String>, value: &str) {
    if !value.is_empty() && !secrets.iter().any(|s| s == value) {
        secrets.push(value.to_string());
    }
}

// `${env:NAME}` / `${file:PATH}` references are read by the journal layer's
// `expand`, which every setting holding a secret (here, inventories' become
// passwords) shares.
pub use crate::journal::expand;

/// The JSON a webhook (or a `json` command) receives.
pub fn webhook_body(channel: &str, notice: &Notice) -> Value {
    let mut body = json!({
        "text": notice.text,
        "severity": notice.severity,
        "source": "patchbook",
        "channel": channel,
    });
    if let Some(event) = notice.event {
        body["event"] = json!(event);
    }
    if !notice.fields.is_empty() {
        body["fields"] = Value::Object(notice.fields.clone());
    }
    body
}

fn attempt(
    cfg: &NotifyConfig,
    channel: &str,
    prepared: &Prepared,
    contact: Option<&[Mailbox]>,
    notice: &Notice,
) -> Result<(), Failure> {
    match prepared {
        Prepared::Webhook {
            url,
            headers,
            timeout,
        } => post(
            url,
            headers,
            timeout.unwrap_or(cfg.timeout),
            channel,
            notice,
        ),
        Prepared::Smtp {
            transport,
            from,
            to,
        } => mail(transport, from, contact.unwrap_or(to), notice),
        Prepared::Command {
            argv,
            stdin,
            timeout,
        } => run_command(
            argv,
            *stdin,
            timeout.unwrap_or(cfg.timeout),
            channel,
            notice,
        ),
    }
}

fn post(
    url: &str,
    headers: &[(String, String)],
    timeout: Duration,
    channel: &str,
    notice: &Notice,
) -> Result<(), Failure> {
    // No redirects: following one would hand the headers' credentials to
    // whichever host the redirect names.
    let agent = ureq::AgentBuilder::new()
        .timeout(timeout)
        .redirects(0)
        .build();
    let mut req = agent
        .post(url)
        .set("Content-Type", "application/json; charset=utf-8");
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let body = webhook_body(channel, notice).to_string();
    match req.send_string(&body) {
        Ok(_) => Ok(()),
        Err(ureq::Error::Status(code, resp)) => {
            let status = resp.status_text().to_string();
            let mut reply = Vec::new();
            let _ = resp
                .into_reader()
                .take(MAX_REPLY_BYTES)
                .read_to_end(&mut reply);
            let reply = String::from_utf8_lossy(&reply);
            let msg = format!("webhook answered HTTP {code} {status}: {}", reply.trim());
            // Client errors other than timeouts and rate limits will not heal.
            if (400..500).contains(&code) && code != 408 && code != 429 {
                Err(Failure::Permanent(msg))
            } else {
                Err(Failure::Retry(msg))
            }
        }
        // The URL is left out of the message: chat hook URLs carry their token.
        Err(ureq::Error::Transport(t)) => Err(Failure::Retry(format!(
            "webhook unreachable: {}{}",
            t.kind(),
            t.message().map(|m| format!(": {m}")).unwrap_or_default()
        ))),
    }
}

fn mail(
    transport: &SmtpTransport,
    from: &Mailbox,
    to: &[Mailbox],
    notice: &Notice,
) -> Result<(), Failure> {
    if to.is_empty() {
        return Err(Failure::Permanent(
            "no recipients: set `to` on the smtp channel or address a contact".into(),
        ));
    }
    let mut builder = Message::builder()
        .from(from.clone())
        .subject(format!(
            "[patchbook {}] {}",
            notice.severity,
            notice.headline()
        ))
        .header(ContentType::TEXT_PLAIN);
    for r in to {
        builder = builder.to(r.clone());
    }
    let mut body = notice.text.clone();
    if !notice.fields.is_empty() {
        body.push_str("\n\n");
        for (k, v) in &notice.fields {
            let v = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            body.push_str(&format!("{k}: {v}\n"));
        }
    }
    let message = builder
        .body(body)
        .map_err(|e| Failure::Permanent(format!("cannot build the mail: {e}")))?;
    match transport.send(&message) {
        Ok(_) => Ok(()),
        Err(e) if e.is_permanent() => Err(Failure::Permanent(format!("smtp: {e}"))),
        Err(e) => Err(Failure::Retry(format!("smtp: {e}"))),
    }
}

fn run_command(
    argv: &[String],
    format: StdinFormat,
    timeout: Duration,
    channel: &str,
    notice: &Notice,
) -> Result<(), Failure> {
    let event = notice.event.map(Event::as_str).unwrap_or("message");
    let argv: Vec<String> = argv
        .iter()
        .map(|w| {
            w.replace("{severity}", notice.severity.as_str())
                .replace("{channel}", channel)
                .replace("{event}", event)
        })
        .collect();
    let stdin = match format {
        StdinFormat::Text => {
            let mut t = notice.text.clone();
            if !t.ends_with('\n') {
                t.push('\n');
            }
            t.into_bytes()
        }
        StdinFormat::Json => webhook_body(channel, notice).to_string().into_bytes(),
    };
    let cmd = Command::new(argv)
        .stdin(stdin)
        .timeout(timeout)
        .output_cap(64 * 1024);
    match LocalTransport::new("controller").run(&cmd) {
        Ok(out) if out.success() => Ok(()),
        Ok(out) => Err(Failure::Retry(format!(
            "command exited with {}: {}",
            out.code,
            out.stderr_str().trim()
        ))),
        Err(e @ TransportError::Io { .. }) => Err(Failure::Permanent(e.to_string())),
        Err(e) => Err(Failure::Retry(e.to_string())),
    }
}

pub use crate::config::parse_duration;

// ---------------------------------------------------------------------------
// Automatic notification texts. The rollout layer fills these plain structs.

/// "Run started": who patches how many hosts, and in which window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunStarted {
    pub run: String,
    pub playbook: String,
    pub operator: String,
    pub targets: Vec<String>,
    /// The maintenance window as written, e.g. `Sat 02:00-06:00 Asia/Hong_Kong`.
    pub window: Option<String>,
}

/// The first host of a run that failed; sent to its owners as escalation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FirstFailure {
    pub run: String,
    pub host: String,
    /// The step that failed, e.g. `deploy`.
    pub step: Option<String>,
    pub reason: String,
    /// What happens to the host now, e.g. `rolled back`.
    pub action: Option<String>,
}

/// The failure budget (or, with `unreachable`, the unreachable budget) is spent:
/// no new waves start.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BudgetExhausted {
    pub run: String,
    /// The hosts charged to the budget: failed ones, or unreachable ones.
    pub failed_hosts: Vec<String>,
    /// The budget spent is `max_unreachable`, not `max_failed`.
    pub unreachable: bool,
    pub targets: usize,
    /// The policy as written, e.g. `5%` or `3`.
    pub budget: String,
    /// What the policy does now, e.g. `rolling back 12 hosts in reverse order`.
    pub action: Option<String>,
}

/// Final counts of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunSummary {
    pub targeted: usize,
    pub patched: usize,
    pub failed: usize,
    /// Could not be connected to; apart from `failed`.
    pub unreachable: usize,
    pub rolled_back: usize,
    pub skipped: usize,
    pub pending: usize,
}

/// "Run finished": the summary and where the report is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunFinished {
    pub run: String,
    pub summary: RunSummary,
    pub report: Option<String>,
    pub duration: Option<Duration>,
}

fn host_list(hosts: &[String]) -> String {
    let shown: Vec<&str> = hosts
        .iter()
        .take(MAX_LISTED_HOSTS)
        .map(String::as_str)
        .collect();
    let mut s = shown.join(", ");
    if hosts.len() > MAX_LISTED_HOSTS {
        s.push_str(&format!(" and {} more", hosts.len() - MAX_LISTED_HOSTS));
    }
    s
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

impl RunStarted {
    pub fn notice(&self) -> Notice {
        let mut text = format!(
            "patchbook run {} started by {}: patching {} with {}",
            self.run,
            self.operator,
            plural(self.targets.len(), "host", "hosts"),
            self.playbook
        );
        match &self.window {
            Some(w) => text.push_str(&format!(" in window {w}")),
            None => text.push_str(" (no maintenance window set)"),
        }
        if !self.targets.is_empty() {
            text.push_str(&format!("\nTargets: {}", host_list(&self.targets)));
        }
        let mut n = Notice::new(text, Severity::Info)
            .field("run", self.run.as_str())
            .field("playbook", self.playbook.as_str())
            .field("operator", self.operator.as_str())
            .field("targets", self.targets.len());
        if let Some(w) = &self.window {
            n = n.field("window", w.as_str());
        }
        n.event = Some(Event::RunStarted);
        n
    }
}

impl FirstFailure {
    pub fn notice(&self) -> Notice {
        let step = self
            .step
            .as_deref()
            .map(|s| format!(" at {s}"))
            .unwrap_or_default();
        let mut text = format!(
            "patchbook run {}: first failure on {}{step}: {}",
            self.run,
            self.host,
            self.reason.trim()
        );
        if let Some(a) = &self.action {
            text.push_str(&format!("\nThe host is being {a}."));
        }
        text.push_str("\nYou receive this as an owner of the host.");
        let mut n = Notice::new(text, Severity::Warning)
            .field("run", self.run.as_str())
            .field("host", self.host.as_str())
            .field("reason", self.reason.trim());
        if let Some(s) = &self.step {
            n = n.field("step", s.as_str());
        }
        n.event = Some(Event::FirstFailure);
        n
    }
}

impl BudgetExhausted {
    pub fn notice(&self) -> Notice {
        let (which, verb, list) = if self.unreachable {
            (
                "unreachable budget (max_unreachable)",
                "unreachable",
                "Unreachable",
            )
        } else {
            ("failure budget", "failed", "Failed")
        };
        let mut text = format!(
            "patchbook run {}: {which} {} exhausted ({} of {} {verb}); no new waves start",
            self.run,
            self.budget,
            self.failed_hosts.len(),
            plural(self.targets, "host", "hosts"),
        );
        if let Some(a) = &self.action {
            text.push_str(&format!("; {a}"));
        }
        text.push_str(&format!("\n{list}: {}", host_list(&self.failed_hosts)));
        let mut n = Notice::new(text, Severity::Critical)
            .field("run", self.run.as_str())
            .field("budget", self.budget.as_str())
            .field("failed", self.failed_hosts.len())
            .field("targets", self.targets);
        n.event = Some(Event::BudgetExhausted);
        n
    }
}

impl RunFinished {
    pub fn notice(&self) -> Notice {
        let s = &self.summary;
        let took = self
            .duration
            .map(|d| format!(" after {}", human_duration(d)))
            .unwrap_or_default();
        let unreachable = if s.unreachable > 0 {
            format!(", {} unreachable", s.unreachable)
        } else {
            String::new()
        };
        let mut text = format!(
            "patchbook run {} finished{took}: {} targeted, {} patched, {} failed{unreachable}, {} rolled back, {} skipped, {} pending",
            self.run, s.targeted, s.patched, s.failed, s.rolled_back, s.skipped, s.pending
        );
        if let Some(r) = &self.report {
            text.push_str(&format!("\nReport: {r}"));
        }
        let severity = if s.failed > 0 || s.unreachable > 0 || s.rolled_back > 0 || s.pending > 0 {
            Severity::Warning
        } else {
            Severity::Info
        };
        let mut n = Notice::new(text, severity)
            .field("run", self.run.as_str())
            .field("targeted", s.targeted)
            .field("patched", s.patched)
            .field("failed", s.failed)
            .field("unreachable", s.unreachable)
            .field("rolled_back", s.rolled_back)
            .field("skipped", s.skipped)
            .field("pending", s.pending);
        if let Some(r) = &self.report {
            n = n.field("report", r.as_str());
        }
        n.event = Some(Event::RunFinished);
        n
    }
}

/// A host under soak after its run moved past a soak threshold; sent to its
/// owners as an escalation, once per host and soak.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SoakRegression {
    /// The run that patched the host.
    pub run: String,
    pub host: String,
    /// One line per metric past its threshold.
    pub regressions: Vec<String>,
    /// How long after the soak began the regression was seen.
    pub after: Duration,
}

impl SoakRegression {
    pub fn notice(&self) -> Notice {
        let text = format!(
            "patchbook soak: {} regressed {} after run {}: {}\n\
             The host keeps its patch; roll it back with `patchbook rollback {} --hosts {}` if the regression is the patch's.\n\
             You receive this as an owner of the host.",
            self.host,
            human_duration(self.after),
            self.run,
            self.regressions.join("; "),
            self.run,
            self.host,
        );
        let mut n = Notice::new(text, Severity::Warning)
            .field("run", self.run.as_str())
            .field("host", self.host.as_str())
            .field("regressions", self.regressions.join("; "));
        n.event = Some(Event::SoakRegression);
        n
    }
}

fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> NotifyConfig {
        #[derive(Deserialize)]
        struct Wrap {
            notify: NotifyConfig,
        }
        toml::from_str::<Wrap>(text).unwrap().notify
    }

    #[test]
    fn parses_the_documented_example() {
        let c = cfg(r#"
            [notify]
            contacts_channel = "ops-mail"
            retries = 2
            backoff = "250ms"
            events = ["run_started", "run_finished"]
            [notify.channels.ops-chat]
            type = "webhook"
            url = "https://hooks.example.com/T000/B000"
            headers = { Authorization = "Bearer ${env:CHAT_TOKEN}" }
            [notify.channels.ops-mail]
            type = "smtp"
            server = "127.0.0.1"
            port = 2525
            starttls = "opportunistic"
            from = "patchbook@example.com"
            to = ["ops@example.com"]
            [notify.channels.pager]
            type = "command"
            argv = ["/usr/local/bin/page-oncall", "--severity", "{severity}"]
        "#);
        assert_eq!(c.retries, 2);
        assert_eq!(c.backoff, Duration::from_millis(250));
        assert_eq!(c.events, vec![Event::RunStarted, Event::RunFinished]);
        assert!(matches!(c.channels["ops-chat"], Channel::Webhook(_)));
        match &c.channels["ops-mail"] {
            Channel::Smtp(s) => {
                assert_eq!(s.starttls, StartTls::Opportunistic);
                assert_eq!(s.port, Some(2525));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(c.channels["pager"], Channel::Command(_)));
        c.check().unwrap();
    }

    #[test]
    fn debug_output_hides_urls_header_values_and_passwords() {
        let c = cfg(r#"
            [notify.channels.hook]
            type = "webhook"
            url = "https://hooks.example.com/services/T0/B0/literal-hook-token"
            headers = { Authorization = "Bearer literal-bearer" }
            [notify.channels.mail]
            type = "smtp"
            server = "relay"
            from = "a@example.com"
            username = "pb"
            password = "literal-password"
        "#);
        let shown = format!("{c:?}");
        for secret in ["literal-hook-token", "literal-bearer", "literal-password"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("Authorization"), "{shown}");
        let mut secrets = c.secrets();
        secrets.sort();
        assert_eq!(secrets, vec!["literal-password".to_string()]);
    }

    #[test]
    fn longer_secrets_are_hidden_whole() {
        let c = NotifyConfig::default();
        let d = notify(
            &c,
            &["nobody-abc-abcdef".into()],
            "x",
            Severity::Info,
            &["abc".into(), "abcdef".into()],
        );
        let e = d[0].error.as_deref().unwrap();
        assert!(e.contains("nobody-***-***"), "{e}");
    }

    #[test]
    fn long_errors_are_cut_after_redaction() {
        let secret = "s".repeat(50);
        let text = format!("{}{secret}", "x".repeat(MAX_ERROR_CHARS - 10));
        let cut = shorten(redact_str(&text, &[secret]));
        assert!(!cut.contains("ssssssssss"), "{cut}");
        assert!(cut.ends_with("***"), "{cut}");
        assert_eq!(
            shorten("y".repeat(1000)).chars().count(),
            MAX_ERROR_CHARS + 1
        );
    }

    #[test]
    fn a_soak_regression_escalates_to_the_owners() {
        let n = SoakRegression {
            run: "r9".into(),
            host: "db01".into(),
            regressions: vec![
                "error_rate 6.00 after the change, baseline 0.00, limit 0.00 (2x)".into(),
            ],
            after: Duration::from_secs(3 * 3600),
        }
        .notice();
        assert_eq!(n.event, Some(Event::SoakRegression));
        assert!(Event::SoakRegression.is_escalation());
        assert_eq!(
            n.headline(),
            "patchbook soak: db01 regressed 3h00m after run r9: error_rate 6.00 after the change, baseline 0.00, limit 0.00 (2x)"
        );
        assert!(
            n.text.contains("patchbook rollback r9 --hosts db01"),
            "{}",
            n.text
        );
    }

    #[test]
    fn defaults_send_every_event() {
        let c = NotifyConfig::default();
        assert_eq!(c.events.len(), 5);
        assert_eq!(c.retries, 3);
        assert_eq!(cfg("[notify]\n").events.len(), 5);
    }

    #[test]
    fn unknown_keys_and_kinds_are_rejected() {
        #[derive(Deserialize, Debug)]
        #[allow(dead_code)]
        struct Wrap {
            notify: NotifyConfig,
        }
        let e = toml::from_str::<Wrap>(
            "[notify.channels.x]\ntype = \"webhook\"\nurl = \"https://a\"\nheader = {}\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("header"), "{e}");
        let e = toml::from_str::<Wrap>("[notify.channels.x]\ntype = \"pigeon\"\n").unwrap_err();
        assert!(e.to_string().contains("pigeon"), "{e}");
        let e = toml::from_str::<Wrap>(
            "[notify.channels.x]\ntype = \"smtp\"\nserver = \"h\"\nfrom = \"a@b.c\"\nstarttls = \"maybe\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("opportunistic"), "{e}");
        let e = toml::from_str::<Wrap>("[notify]\nbackoff = \"soon\"\n").unwrap_err();
        assert!(e.to_string().contains("not a duration"), "{e}");
    }

    #[test]
    fn check_catches_bad_references() {
        let c = cfg(r#"
            [notify]
            contacts_channel = "hook"
            [notify.channels.hook]
            type = "webhook"
            url = "https://x"
        "#);
        let e = c.check().unwrap_err().to_string();
        assert!(e.contains("must name an smtp channel"), "{e}");
        let c = cfg("[notify]\nto = [\"nobody\"]\n");
        let e = c.check().unwrap_err().to_string();
        assert!(e.contains("neither a channel"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("20ms").unwrap(), Duration::from_millis(20));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn expand_reads_env_and_files_and_remembers_them() {
        std::env::set_var("PB_NOTIFY_UNIT_TOKEN", "tok-123");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "pw-456\n").unwrap();
        let mut secrets = Vec::new();
        let v = expand(
            &format!(
                "Bearer ${{env:PB_NOTIFY_UNIT_TOKEN}} ${{file:{}}} $5",
                f.display()
            ),
            &mut secrets,
        )
        .unwrap();
        assert_eq!(v, "Bearer tok-123 pw-456 $5");
        assert_eq!(secrets, vec!["tok-123".to_string(), "pw-456".to_string()]);
        let e = expand("${env:PB_NOTIFY_UNSET_VAR_X}", &mut secrets).unwrap_err();
        assert!(e.contains("export PB_NOTIFY_UNSET_VAR_X"), "{e}");
        assert!(expand("${vault:x}", &mut secrets).is_err());
        assert!(expand("${env:X", &mut secrets).is_err());
    }

    #[test]
    fn routing_contacts_and_addresses() {
        let c = cfg(r#"
            [notify]
            contacts_channel = "mail"
            contacts = { db-team = "db@example.com", oncall = "hook" }
            [notify.channels.mail]
            type = "smtp"
            server = "127.0.0.1"
            from = "pb@example.com"
            [notify.channels.hook]
            type = "webhook"
            url = "https://x"
        "#);
        let r = c.route("alice@example.com").unwrap();
        assert_eq!(r.name, "mail");
        assert_eq!(
            r.recipients.unwrap()[0].email.to_string(),
            "alice@example.com"
        );
        let r = c.route("db-team").unwrap();
        assert_eq!(r.name, "mail");
        assert_eq!(r.recipients.unwrap()[0].email.to_string(), "db@example.com");
        assert_eq!(c.route("oncall").unwrap().name, "hook");
        assert!(c.route("hook").unwrap().recipients.is_none());
        assert!(c.route("bob").is_err());
    }

    #[test]
    fn unknown_addressee_is_a_failed_delivery_not_an_error() {
        let d = notify(
            &NotifyConfig::default(),
            &["bob".into(), "bob".into()],
            "hi",
            Severity::Info,
            &[],
        );
        assert_eq!(d.len(), 1, "duplicates are sent once");
        assert!(!d[0].ok);
        assert_eq!(d[0].attempts, 0);
        assert!(d[0].error.as_deref().unwrap().contains("neither a channel"));
    }

    #[test]
    fn severity_parses() {
        assert_eq!("WARNING".parse::<Severity>().unwrap(), Severity::Warning);
        assert!("loud".parse::<Severity>().is_err());
    }

    #[test]
    fn templates() {
        let targets: Vec<String> = (1..=12).map(|i| format!("web{i:02}")).collect();
        let n = RunStarted {
            run: "r1".into(),
            playbook: "patch.rhai".into(),
            operator: "ana".into(),
            targets,
            window: Some("Sat 02:00-06:00 UTC".into()),
        }
        .notice();
        assert!(n.text.contains("patching 12 hosts"), "{}", n.text);
        assert!(n.text.contains("in window Sat 02:00-06:00 UTC"));
        assert!(n.text.contains("web10 and 2 more"), "{}", n.text);
        assert_eq!(n.event, Some(Event::RunStarted));
        assert_eq!(n.fields["targets"], 12);

        let n = FirstFailure {
            run: "r1".into(),
            host: "db1".into(),
            step: Some("verify".into()),
            reason: "acme-agent is 1.0.0, wanted 1.0.1\n".into(),
            action: Some("rolled back".into()),
        }
        .notice();
        assert_eq!(n.severity, Severity::Warning);
        assert!(n
            .headline()
            .contains("first failure on db1 at verify: acme-agent is 1.0.0"));

        let n = BudgetExhausted {
            run: "r1".into(),
            failed_hosts: vec!["a".into(), "b".into()],
            unreachable: false,
            targets: 40,
            budget: "5%".into(),
            action: None,
        }
        .notice();
        assert_eq!(n.severity, Severity::Critical);
        assert!(
            n.text
                .contains("budget 5% exhausted (2 of 40 hosts failed)"),
            "{}",
            n.text
        );
        let n = BudgetExhausted {
            run: "r1".into(),
            failed_hosts: vec!["c".into()],
            unreachable: true,
            targets: 40,
            budget: "0".into(),
            action: None,
        }
        .notice();
        assert!(
            n.text.contains(
                "unreachable budget (max_unreachable) 0 exhausted (1 of 40 hosts unreachable)"
            ) && n.text.contains("Unreachable: c"),
            "{}",
            n.text
        );

        let n = RunFinished {
            run: "r1".into(),
            summary: RunSummary {
                targeted: 10,
                patched: 10,
                ..Default::default()
            },
            report: Some(".patchbook/reports/r1.html".into()),
            duration: Some(Duration::from_secs(125)),
        }
        .notice();
        assert_eq!(n.severity, Severity::Info);
        assert!(n
            .text
            .contains("finished after 2m05s: 10 targeted, 10 patched, 0 failed"));
        assert!(n.text.contains("Report: .patchbook/reports/r1.html"));
    }

    #[test]
    fn disabled_events_send_nothing() {
        let c = NotifyConfig {
            events: vec![Event::RunFinished],
            to: vec!["nowhere".into()],
            ..Default::default()
        };
        let n = RunStarted::default().notice();
        assert!(automatic(&c, &n, &[], &[]).is_empty());
        let n = FirstFailure::default().notice();
        assert!(automatic(&c, &n, &["owner@example.com".into()], &[]).is_empty());
    }

    #[test]
    fn escalations_add_owners() {
        let c = NotifyConfig {
            to: vec!["ops".into()],
            ..Default::default()
        };
        let n = FirstFailure::default().notice();
        let d = automatic(&c, &n, &["owner-x".into()], &[]);
        let to: Vec<&str> = d.iter().map(|d| d.to.as_str()).collect();
        assert_eq!(to, vec!["ops", "owner-x"]);
        let d = automatic(
            &c,
            &RunStarted::default().notice(),
            &["owner-x".into()],
            &[],
        );
        assert_eq!(d.len(), 1);
    }
}
