//! The downlink: commands from Kafka, through an encoder, to the devices behind the gateway.

mod template;

pub use template::Template;
