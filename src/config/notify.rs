//! The `[notify]` section of `patchbook.toml` as plain data: named channels
//! (`webhook`, `smtp`, `command`), contacts, recipients of the automatic
//! notifications, retries and timeouts.
//!
//! It only says what the file may contain. Checking cross references, resolving
//! `${env:…}`/`${file:…}` secrets, routing and delivery belong to
//! `primitives::notify`, which re-exports these types; nothing here sends anything
//! or reads anything but the TOML it is given.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::parse_duration;

/// The automatic notifications a run can send; `[notify] events` enables them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    RunStarted,
    FirstFailure,
    BudgetExhausted,
    RunFinished,
    /// A host `watch` soaks after its run regressed past a soak threshold.
    SoakRegression,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Event::RunStarted => "run_started",
            Event::FirstFailure => "first_failure",
            Event::BudgetExhausted => "budget_exhausted",
            Event::RunFinished => "run_finished",
            Event::SoakRegression => "soak_regression",
        }
    }

    /// Escalations also go to the owners of the hosts concerned.
    pub fn is_escalation(self) -> bool {
        matches!(
            self,
            Event::FirstFailure | Event::BudgetExhausted | Event::SoakRegression
        )
    }

    pub fn all() -> Vec<Event> {
        vec![
            Event::RunStarted,
            Event::FirstFailure,
            Event::BudgetExhausted,
            Event::RunFinished,
            Event::SoakRegression,
        ]
    }
}

/// `[notify]` in `patchbook.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    /// Named channels: `[notify.channels.NAME]`.
    #[serde(default)]
    pub channels: BTreeMap<String, Channel>,
    /// The SMTP channel that reaches plain e-mail contacts (inventory `owner`s).
    #[serde(default)]
    pub contacts_channel: Option<String>,
    /// Contact names mapped to an e-mail address or a channel name, for owners
    /// written as names (`owner = "db-team"`).
    #[serde(default)]
    pub contacts: BTreeMap<String, String>,
    /// Where the automatic notifications go (escalations also go to owners).
    #[serde(default)]
    pub to: Vec<String>,
    /// Automatic notifications that are sent; default: all of them.
    #[serde(default = "Event::all")]
    pub events: Vec<Event>,
    /// Retries after the first failed attempt of one delivery.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Wait before the first retry; doubled for each further one.
    #[serde(default = "default_backoff", deserialize_with = "de_duration")]
    pub backoff: Duration,
    /// Deadline of one attempt, unless the channel sets its own.
    #[serde(default = "default_timeout", deserialize_with = "de_duration")]
    pub timeout: Duration,
}

fn default_retries() -> u32 {
    3
}
fn default_backoff() -> Duration {
    Duration::from_secs(1)
}
fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            channels: BTreeMap::new(),
            contacts_channel: None,
            contacts: BTreeMap::new(),
            to: Vec::new(),
            events: Event::all(),
            retries: default_retries(),
            backoff: default_backoff(),
            timeout: default_timeout(),
        }
    }
}

/// One `[notify.channels.NAME]` table; `type` picks the kind.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Channel {
    Webhook(WebhookChannel),
    Smtp(SmtpChannel),
    Command(CommandChannel),
}

impl Channel {
    pub fn kind(&self) -> &'static str {
        match self {
            Channel::Webhook(_) => "webhook",
            Channel::Smtp(_) => "smtp",
            Channel::Command(_) => "command",
        }
    }
}

/// A JSON POST with a Slack-compatible `text` field.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookChannel {
    /// May reference a secret (`${env:HOOK_URL}`): chat hook URLs often are one.
    pub url: String,
    /// Sent with every request; values may reference secrets.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub timeout: Option<Duration>,
}

/// Mail through an SMTP relay.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpChannel {
    pub server: String,
    /// Default 587 with `starttls = "required"`, 25 otherwise.
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub starttls: StartTls,
    pub from: String,
    /// Recipients when the channel is named directly; a contact replaces them.
    #[serde(default)]
    pub to: Vec<String>,
    #[serde(default)]
    pub username: Option<String>,
    /// May reference a secret; always redacted.
    #[serde(default)]
    pub password: Option<String>,
    /// PEM file of an extra CA to trust for STARTTLS (a private relay's CA).
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub timeout: Option<Duration>,
}

// Debug output ends up in logs and panics: URLs (chat hook URLs carry their
// token), header values and passwords are shown as `***`.
impl fmt::Debug for WebhookChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let headers: BTreeMap<&str, &str> =
            self.headers.keys().map(|k| (k.as_str(), "***")).collect();
        f.debug_struct("WebhookChannel")
            .field("url", &"***")
            .field("headers", &headers)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl fmt::Debug for SmtpChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpChannel")
            .field("server", &self.server)
            .field("port", &self.port)
            .field("starttls", &self.starttls)
            .field("from", &self.from)
            .field("to", &self.to)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("ca_file", &self.ca_file)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// `starttls = true | false | "required" | "opportunistic"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "StartTlsSetting")]
pub enum StartTls {
    /// Plain SMTP; only sensible towards a relay on the same machine.
    #[default]
    Off,
    /// Upgrade when the server offers it, plain otherwise.
    Opportunistic,
    /// Refuse to send unless the connection is upgraded.
    Required,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StartTlsSetting {
    Flag(bool),
    Mode(String),
}

impl TryFrom<StartTlsSetting> for StartTls {
    type Error = String;
    fn try_from(v: StartTlsSetting) -> Result<Self, Self::Error> {
        match v {
            StartTlsSetting::Flag(true) => Ok(StartTls::Required),
            StartTlsSetting::Flag(false) => Ok(StartTls::Off),
            StartTlsSetting::Mode(m) => match m.as_str() {
                "required" => Ok(StartTls::Required),
                "opportunistic" => Ok(StartTls::Opportunistic),
                "off" | "none" => Ok(StartTls::Off),
                other => Err(format!(
                    "starttls = \"{other}\": use true, false, \"required\" or \"opportunistic\""
                )),
            },
        }
    }
}

/// A program that gets the message on stdin. Never run through a shell.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandChannel {
    /// `{severity}`, `{channel}` and `{event}` are replaced in each word.
    pub argv: Vec<String>,
    /// `text` (default) or `json` (the same body a webhook gets).
    #[serde(default)]
    pub stdin: StdinFormat,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StdinFormat {
    #[default]
    Text,
    Json,
}

fn de_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

fn de_opt_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}
