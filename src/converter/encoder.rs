//! TEMPORARY STUB (replaced by the encoder branch): the API the downlink codes against.
use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::config::ConverterConfig;

use super::{ConvertError, ConverterError, ConvertersGone};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentType {
    Json,
    Text,
    Binary,
}

#[derive(Debug, Clone)]
pub struct Downlink {
    pub content_type: ContentType,
    pub data: Vec<u8>,
    pub metadata: BTreeMap<String, String>,
}

pub struct EncodeJob {
    pub value: Vec<u8>,
    pub metadata: Vec<(String, String)>,
    pub msg_type: String,
    pub seq: u64,
}

pub struct Encoders;

impl Encoders {
    pub fn start(
        _name: &str,
        _config: &ConverterConfig,
        _debug_dir: PathBuf,
        _gateway_id: String,
    ) -> Result<Encoders, ConverterError> {
        Ok(Encoders)
    }

    pub async fn encode(
        &self,
        job: EncodeJob,
    ) -> Result<Result<Vec<Downlink>, ConvertError>, ConvertersGone> {
        Ok(Ok(vec![Downlink {
            content_type: ContentType::Text,
            data: job.value,
            metadata: BTreeMap::new(),
        }]))
    }
}
