//! Routes: which source's connection an encoded message goes through, and where to.

use std::collections::{BTreeMap, HashMap};

use crate::config::DownlinkConfig;
use crate::converter::Downlink;
use crate::sources::mqtt::MqttOutlet;
use crate::sources::serial::SerialOutlet;

use super::Template;

/// How the downlink reaches a source's devices.
#[derive(Clone)]
pub enum Outlet {
    Mqtt(MqttOutlet),
    Serial(SerialOutlet),
}

/// Outlets by source name; the gateway fills it as it starts the sources.
pub type Outlets = HashMap<String, Outlet>;

/// The `route` label of messages that reached no route.
pub const NO_ROUTE: &str = "none";

pub struct Routes(Vec<Route>);

struct Route {
    label: String,
    matches: BTreeMap<String, String>,
    target: Target,
}

#[derive(Clone)]
enum Target {
    Mqtt {
        outlet: MqttOutlet,
        topic: Template,
        qos: u8,
    },
    Serial(SerialOutlet),
}

/// One message on its way to a device.
pub struct Delivery {
    /// The route's metric label.
    pub route: String,
    to: To,
    payload: Vec<u8>,
}

enum To {
    Mqtt {
        outlet: MqttOutlet,
        topic: String,
        qos: u8,
    },
    Serial(SerialOutlet),
}

/// Why a message has no delivery: the command itself is at fault, retrying cannot help.
#[derive(Debug)]
pub struct Unroutable {
    pub route: String,
    pub error: String,
}

impl Routes {
    /// `check` verified that every route names an existing source of the right kind and that its
    /// template parses; a route that still does not resolve is left out with an error line.
    pub fn new(config: &DownlinkConfig, outlets: &Outlets) -> Routes {
        let mut routes = Vec::new();
        for (i, r) in config.routes.iter().enumerate() {
            let target = match (outlets.get(&r.source), &r.topic) {
                (Some(Outlet::Mqtt(outlet)), Some(topic)) => match Template::parse(topic) {
                    Ok(topic) => Target::Mqtt {
                        outlet: outlet.clone(),
                        topic,
                        qos: r.qos,
                    },
                    Err(e) => {
                        tracing::error!(route = i, error = %e, "downlink route left out");
                        continue;
                    }
                },
                (Some(Outlet::Serial(outlet)), _) => Target::Serial(outlet.clone()),
                _ => {
                    tracing::error!(route = i, source = %r.source, "downlink route left out: no such source");
                    continue;
                }
            };
            routes.push(Route {
                label: format!("{i}:{}", r.source),
                matches: r.matches.clone(),
                target,
            });
        }
        Routes(routes)
    }

    /// The labels of every route, for metrics that should show zero before the first command.
    pub fn labels(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|r| r.label.as_str())
    }

    /// Where one encoded message goes: the first route whose `match` entries all equal the
    /// message's metadata. The metadata is the encoder's output metadata over the record's own,
    /// so that a template can use `${deviceName}` from ThingsBoard's headers.
    pub fn plan(
        &self,
        message: Downlink,
        record_metadata: &[(String, String)],
    ) -> Result<Delivery, Unroutable> {
        let mut metadata: BTreeMap<String, String> = record_metadata.iter().cloned().collect();
        metadata.extend(message.metadata);
        let route = self
            .0
            .iter()
            .find(|r| r.matches.iter().all(|(k, v)| metadata.get(k) == Some(v)))
            .ok_or_else(|| Unroutable {
                route: NO_ROUTE.into(),
                error: "no [[downlink.routes]] entry matches the message's metadata".into(),
            })?;
        let to = match &route.target {
            Target::Mqtt { outlet, topic, qos } => To::Mqtt {
                outlet: outlet.clone(),
                topic: topic.fill(&metadata).map_err(|error| Unroutable {
                    route: route.label.clone(),
                    error,
                })?,
                qos: *qos,
            },
            Target::Serial(outlet) => To::Serial(outlet.clone()),
        };
        Ok(Delivery {
            route: route.label.clone(),
            to,
            payload: message.data,
        })
    }
}

/// Why an attempt failed.
#[derive(Debug)]
pub struct Failed {
    pub error: String,
    /// The same message can never succeed: give it up now rather than after `max_age`.
    pub permanent: bool,
}

impl Delivery {
    /// One attempt; a failure that is not [`Failed::permanent`] is worth a retry (the device or
    /// its broker may come back).
    pub async fn attempt(&self) -> Result<(), Failed> {
        match &self.to {
            To::Mqtt { outlet, topic, qos } => outlet
                .publish(topic.clone(), *qos, self.payload.clone())
                .await
                .map_err(|e| Failed {
                    permanent: e.is_permanent(),
                    error: e.to_string(),
                }),
            To::Serial(outlet) => outlet
                .write(self.payload.clone())
                .await
                .map_err(|e| Failed {
                    permanent: false,
                    error: e.to_string(),
                }),
        }
    }

    pub fn len(&self) -> usize {
        self.payload.len()
    }
}

#[cfg(test)]
mod tests {
    use crate::config::RouteConfig;
    use crate::converter::ContentType;

    use super::*;

    fn config(routes: Vec<RouteConfig>) -> DownlinkConfig {
        let text = "topics = [\"c\"]\n";
        let mut c: DownlinkConfig = toml::from_str(text).unwrap();
        c.routes = routes;
        c
    }

    fn route(matches: &[(&str, &str)], source: &str, topic: Option<&str>) -> RouteConfig {
        RouteConfig {
            matches: matches
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            source: source.into(),
            topic: topic.map(Into::into),
            qos: 1,
        }
    }

    fn message(meta: &[(&str, &str)]) -> Downlink {
        Downlink {
            content_type: ContentType::Json,
            data: b"{}".to_vec(),
            metadata: meta
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
        }
    }

    fn outlets() -> Outlets {
        let mut o = Outlets::new();
        o.insert("plant".into(), Outlet::Mqtt(MqttOutlet::default()));
        o.insert("rs485".into(), Outlet::Serial(SerialOutlet::default()));
        o
    }

    #[test]
    fn the_first_matching_route_wins_and_fills_its_topic() {
        let routes = Routes::new(
            &config(vec![
                route(
                    &[("transport", "mqtt")],
                    "plant",
                    Some("d/${deviceName}/rpc"),
                ),
                route(&[], "rs485", None),
            ]),
            &outlets(),
        );
        let record = [("deviceName".to_owned(), "pump".to_owned())];
        let d = routes
            .plan(message(&[("transport", "mqtt")]), &record)
            .unwrap();
        assert_eq!(d.route, "0:plant");
        assert!(matches!(&d.to, To::Mqtt { topic, .. } if topic == "d/pump/rpc"));
        let d = routes.plan(message(&[]), &record).unwrap();
        assert_eq!(d.route, "1:rs485");
    }

    #[test]
    fn no_match_and_an_unfilled_template_are_unroutable() {
        let routes = Routes::new(
            &config(vec![route(
                &[("transport", "mqtt")],
                "plant",
                Some("d/${deviceName}"),
            )]),
            &outlets(),
        );
        let e = routes.plan(message(&[]), &[]).err().unwrap();
        assert_eq!(e.route, NO_ROUTE);
        let e = routes
            .plan(message(&[("transport", "mqtt")]), &[])
            .err()
            .unwrap();
        assert_eq!(e.route, "0:plant");
        assert!(e.error.contains("deviceName"), "{}", e.error);
    }
}
