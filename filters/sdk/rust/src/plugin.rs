//! The plugin a user builds: its declaration, hooks and message handler.

use crate::context::Context;
use crate::message::{Error, Message, Outcome};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

/// A running handler's future.
pub(crate) type HandlerFuture = Pin<Box<dyn Future<Output = Result<Outcome, Error>>>>;
/// A message handler, type-erased.
pub(crate) type Handler<C> = Rc<dyn Fn(Message, Context<C>) -> HandlerFuture>;
/// A configuration check.
pub(crate) type ConfigCheck<C> = Box<dyn Fn(&C) -> Result<(), String>>;

/// How a plugin feels (`health_check`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Health {
    /// Whether it can do its work.
    pub healthy: bool,
    /// Why not, or anything worth saying.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message: String,
}

impl Health {
    /// Healthy.
    pub fn ok() -> Health {
        Health {
            healthy: true,
            message: String::new(),
        }
    }

    /// Not healthy, and why.
    pub fn failing(message: impl Into<String>) -> Health {
        Health {
            healthy: false,
            message: message.into(),
        }
    }
}

/// Who the plugin is (sent to the host at start; the host refuses an API it does not run).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Declaration {
    pub api: &'static str,
    pub sdk: &'static str,
    pub name: String,
    pub version: String,
    pub author: String,
    pub capabilities: Vec<String>,
}

/// Which messages reach the handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Phases {
    pub requests: bool,
    pub responses: bool,
    /// Buffer bodies into `data` (else the handler runs on headers; bodies stream past).
    pub bodies: bool,
}

/// A NIP plugin: `Plugin::new("name").on_message(handler).run()`.
///
/// `C` is the plugin's configuration, read as JSON from the plugin's `config` (an empty
/// config is `C::default()`); see [`Plugin::with_config`].
pub struct Plugin<C = Value> {
    pub(crate) declaration: Declaration,
    pub(crate) phases: Phases,
    pub(crate) handler: Option<Handler<C>>,
    pub(crate) on_init: Option<Box<dyn Fn()>>,
    pub(crate) on_start: Option<Box<dyn Fn()>>,
    pub(crate) on_stop: Option<Box<dyn Fn()>>,
    pub(crate) on_config_change: Option<ConfigCheck<C>>,
    pub(crate) health_check: Option<Box<dyn Fn() -> Health>>,
    pub(crate) resource_usage: Option<Box<dyn Fn() -> Value>>,
}

impl Plugin<Value> {
    /// A plugin whose configuration is any JSON value.
    pub fn new(name: &str) -> Plugin<Value> {
        Plugin::with_config(name)
    }
}

impl<C: DeserializeOwned + Default + 'static> Plugin<C> {
    /// A plugin whose configuration is a `C` (JSON).
    pub fn with_config(name: &str) -> Plugin<C> {
        Plugin {
            declaration: Declaration {
                api: crate::API_VERSION,
                sdk: "rust",
                name: name.to_string(),
                version: String::new(),
                author: String::new(),
                capabilities: Vec::new(),
            },
            phases: Phases {
                requests: true,
                responses: false,
                bodies: true,
            },
            handler: None,
            on_init: None,
            on_start: None,
            on_stop: None,
            on_config_change: None,
            health_check: None,
            resource_usage: None,
        }
    }

    /// The plugin's version.
    pub fn version(mut self, version: &str) -> Self {
        self.declaration.version = version.to_string();
        self
    }

    /// Its author.
    pub fn author(mut self, author: &str) -> Self {
        self.declaration.author = author.to_string();
        self
    }

    /// Something it does (`modify_headers`, `modify_body`, `http_calls`, `local_reply`).
    pub fn capability(mut self, capability: &str) -> Self {
        self.declaration.capabilities.push(capability.to_string());
        self
    }

    /// Handle responses too (requests only by default).
    pub fn responses(mut self, on: bool) -> Self {
        self.phases.responses = on;
        self
    }

    /// Handle requests (on by default).
    pub fn requests(mut self, on: bool) -> Self {
        self.phases.requests = on;
        self
    }

    /// Stream bodies past the plugin: the handler runs on the head alone (`data` is
    /// empty) and cannot change the body. For large bodies; buffering is the default.
    pub fn stream_bodies(mut self) -> Self {
        self.phases.bodies = false;
        self
    }

    /// The message handler: gets each message and the plugin's context, returns the
    /// message (changed or not), a reply, or an error.
    pub fn on_message<F, Fut>(mut self, handler: F) -> Self
    where
        F: Fn(Message, Context<C>) -> Fut + 'static,
        Fut: Future<Output = Result<Outcome, Error>> + 'static,
    {
        self.handler = Some(Rc::new(move |message, context| {
            Box::pin(handler(message, context)) as HandlerFuture
        }));
        self
    }

    /// Runs once when the plugin's VM starts, before its configuration.
    pub fn on_init(mut self, hook: impl Fn() + 'static) -> Self {
        self.on_init = Some(Box::new(hook));
        self
    }

    /// Runs once, after the first configuration was accepted.
    pub fn on_start(mut self, hook: impl Fn() + 'static) -> Self {
        self.on_start = Some(Box::new(hook));
        self
    }

    /// Runs when the host shuts the plugin down.
    pub fn on_stop(mut self, hook: impl Fn() + 'static) -> Self {
        self.on_stop = Some(Box::new(hook));
        self
    }

    /// Checks each new configuration; an error refuses it (the host keeps the plugin it
    /// had, or refuses to load this one), naming the reason.
    pub fn on_config_change(mut self, hook: impl Fn(&C) -> Result<(), String> + 'static) -> Self {
        self.on_config_change = Some(Box::new(hook));
        self
    }

    /// Reports health when the host asks (healthy when not set).
    pub fn health_check(mut self, hook: impl Fn() -> Health + 'static) -> Self {
        self.health_check = Some(Box::new(hook));
        self
    }

    /// Reports the plugin's own resource figures when the host asks.
    pub fn resource_usage(mut self, hook: impl Fn() -> Value + 'static) -> Self {
        self.resource_usage = Some(Box::new(hook));
        self
    }

    /// Hands the plugin to the host: call it from [`crate::main!`].
    pub fn run(self) {
        crate::runtime::install(self);
    }
}
