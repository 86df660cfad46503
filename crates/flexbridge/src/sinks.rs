//! The sink types this binary knows. Each is a crate whose configuration implements
//! [`flexbridge_core::SinkConfig`]; adding one is a crate and a line in `sink_types!` below.

use flexbridge_core::{BuildError, Limits, Sink, SinkConfig as _, SinkContext};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

macro_rules! sink_types {
    ($($variant:ident = $tag:literal: $config:ty,)+) => {
        /// One `[[sinks]]` entry, selected by `type`.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "type")]
        pub enum SinkConfig {
            $(
                #[doc = concat!("`type = \"", $tag, "\"`")]
                #[serde(rename = $tag)]
                $variant(Box<$config>),
            )+
        }

        impl SinkConfig {
            /// The sink's name.
            pub fn name(&self) -> &str {
                match self {
                    $(Self::$variant(c) => c.name(),)+
                }
            }

            /// Reads one `[[sinks]]` table, reporting every bad key as `prefix.key: message`.
            pub fn deserialize_all(
                mut value: serde_json::Value,
                prefix: &str,
                errors: &mut Vec<String>,
            ) -> Option<Self> {
                let tag = match value.as_object_mut().map(|t| t.remove("type")) {
                    None => {
                        errors.push(format!("{prefix}: must be a table"));
                        return None;
                    }
                    Some(Some(serde_json::Value::String(tag))) => tag,
                    Some(_) => {
                        errors.push(format!(
                            "{prefix}.type: missing; expected one of {}",
                            [$(concat!("`", $tag, "`")),+].join(", ")
                        ));
                        return None;
                    }
                };
                match tag.as_str() {
                    $($tag => crate::config::deserialize_all::<$config>(value, prefix, errors)
                        .map(|c| Self::$variant(Box::new(c))),)+
                    other => {
                        errors.push(format!(
                            "{prefix}.type: unknown sink type `{other}`, expected one of {}",
                            [$(concat!("`", $tag, "`")),+].join(", ")
                        ));
                        None
                    }
                }
            }

            /// Every problem of this sink's settings (pure: nothing is opened).
            pub fn validate(&self, limits: &Limits) -> Vec<String> {
                match self {
                    $(Self::$variant(c) => c.plan(limits).err().unwrap_or_default(),)+
                }
            }

            /// Validates, then opens or connects the sink.
            pub async fn open(
                &self,
                limits: &Limits,
                context: &SinkContext,
            ) -> Result<Arc<dyn Sink>, BuildError> {
                Ok(match self {
                    $(Self::$variant(c) => Arc::new(c.open(limits, context).await?),)+
                })
            }
        }
    };
}

sink_types! {
    File = "file": flexbridge_sink_file::FileSinkConfig,
    Stdout = "stdout": flexbridge_sink_file::StdoutSinkConfig,
    Nats = "nats": flexbridge_sink_nats::NatsSinkConfig,
    Rabbitmq = "rabbitmq": flexbridge_sink_rabbitmq::RabbitMqSinkConfig,
    Kafka = "kafka": flexbridge_sink_kafka::KafkaSinkConfig,
}
