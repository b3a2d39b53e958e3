//! A Kafka command record as the encoder sees it: the value, the headers as metadata.

use rdkafka::message::{Headers, Message};

/// ThingsBoard's Kafka rule node writes message metadata as headers with this prefix.
const TB_METADATA_PREFIX: &str = "tb_msg_md_";
/// The uplink marks every record with it; the loop guard skips this gateway's own.
pub const GATEWAY_HEADER: &str = "edgegate-gateway";

/// One consumed record, kept whole until it is delivered or dead-lettered.
#[derive(Debug, Clone)]
pub struct Command {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    /// As they arrived, for the dead-letter topic.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// Header names with `tb_msg_md_` stripped, plus `kafkaKey`.
    pub metadata: Vec<(String, String)>,
    pub msg_type: String,
}

/// What a record is to the downlink.
#[derive(Debug)]
pub enum Input {
    Command(Command),
    /// Carries this gateway's own `edgegate-gateway` header: consuming it would loop. Skipped,
    /// but its offset still counts as finished.
    OwnRecord(Command),
    /// Cannot be turned into metadata; dead-lettered with the reason.
    Malformed(Command, String),
}

/// Reads a record; `default_msg_type` applies when no `msgType` metadata is present.
pub fn read(message: &impl Message, gateway_id: &str, default_msg_type: &str) -> Input {
    let mut command = Command {
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        value: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        headers: Vec::new(),
        metadata: Vec::new(),
        msg_type: default_msg_type.to_owned(),
    };
    let mut malformed = None;
    if let Some(headers) = message.headers() {
        for header in headers.iter() {
            command
                .headers
                .push((header.key.to_owned(), header.value.map(<[u8]>::to_vec)));
            let value = match header.value.map(std::str::from_utf8) {
                None => "",
                Some(Ok(text)) => text,
                Some(Err(_)) => {
                    malformed.get_or_insert_with(|| {
                        format!("header {:?} is not UTF-8 text", header.key)
                    });
                    continue;
                }
            };
            if header.key == GATEWAY_HEADER && value == gateway_id {
                return Input::OwnRecord(command);
            }
            let key = header
                .key
                .strip_prefix(TB_METADATA_PREFIX)
                .unwrap_or(header.key);
            if key.is_empty() {
                malformed.get_or_insert_with(|| "a header has an empty name".into());
                continue;
            }
            if key == "msgType" {
                command.msg_type = value.to_owned();
            }
            command.metadata.push((key.to_owned(), value.to_owned()));
        }
    }
    if let Some(key) = &command.key {
        let key = String::from_utf8_lossy(key).into_owned();
        command.metadata.push(("kafkaKey".to_owned(), key));
    }
    match malformed {
        Some(reason) => Input::Malformed(command, reason),
        None => Input::Command(command),
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};

    use super::*;

    fn record(headers: &[(&str, &[u8])], key: Option<&[u8]>) -> OwnedMessage {
        let mut owned = OwnedHeaders::new();
        for (k, v) in headers {
            owned = owned.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        OwnedMessage::new(
            Some(b"{\"method\":\"on\"}".to_vec()),
            key.map(<[u8]>::to_vec),
            "cmds".into(),
            Timestamp::NotAvailable,
            2,
            41,
            Some(owned),
        )
    }

    fn command(input: Input) -> Command {
        match input {
            Input::Command(c) => c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn thingsboard_metadata_headers_lose_their_prefix_and_the_key_is_kafka_key() {
        let m = record(
            &[
                ("tb_msg_md_deviceName", b"pump-1"),
                ("tb_msg_md_msgType", b"ATTRIBUTES_UPDATED"),
                ("plain", b"x"),
            ],
            Some(b"pump-1"),
        );
        let c = command(read(&m, "gw", "RPC_CALL_FROM_SERVER_TO_DEVICE"));
        assert_eq!(
            c.metadata,
            [
                ("deviceName", "pump-1"),
                ("msgType", "ATTRIBUTES_UPDATED"),
                ("plain", "x"),
                ("kafkaKey", "pump-1")
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
        assert_eq!(c.msg_type, "ATTRIBUTES_UPDATED");
        assert_eq!((c.partition, c.offset), (2, 41));
        assert_eq!(c.headers.len(), 3);
    }

    #[test]
    fn msg_type_defaults_to_the_configured_one() {
        let c = command(read(&record(&[], None), "gw", "RPC"));
        assert_eq!(c.msg_type, "RPC");
        assert!(c.metadata.is_empty());
    }

    #[test]
    fn only_this_gateways_own_records_are_skipped() {
        let own = record(&[(GATEWAY_HEADER, b"gw")], None);
        assert!(matches!(read(&own, "gw", "RPC"), Input::OwnRecord(_)));
        let other = record(&[(GATEWAY_HEADER, b"gw-2")], None);
        assert!(matches!(read(&other, "gw", "RPC"), Input::Command(_)));
    }

    #[test]
    fn a_header_that_is_not_text_makes_the_record_malformed() {
        let m = record(&[("tb_msg_md_x", &[0xff, 0xfe])], None);
        match read(&m, "gw", "RPC") {
            Input::Malformed(_, reason) => assert!(reason.contains("tb_msg_md_x"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }
}
