pub mod framing;
pub mod mqtt;
pub mod serial;
