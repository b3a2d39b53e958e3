//! edgegate: an edge gateway that collects device payloads over MQTT and serial ports, keeps every
//! record durably on local disk while the uplink is down, and produces them to Kafka.
//!
//! Data flows one way through the stages, each with one `run(…, shutdown)` entry point:
//! sources ([`sources::mqtt`], [`sources::serial`]) → [`buffer`] → [`forwarder`] ([`converter`] →
//! [`kafka`] sink); commands flow back through [`downlink`] (Kafka → encoder → device).
//! [`gateway`] wires the stages together, supervises them and applies a [`reload`] of the
//! configuration in place; [`admin`] serves metrics, health and the reload endpoint.

pub mod admin;
pub mod backoff;
pub mod buffer;
pub mod config;
pub mod converter;
pub mod downlink;
pub mod forwarder;
pub mod gateway;
pub mod kafka;
pub mod metrics;
pub mod record;
pub mod reload;
pub mod sources;
pub mod status;
pub mod watchdog;
