use bytes::{Buf, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::{Error, FixedHeader, Packet, PacketType, Publish};
use crate::mqttbytes::{parse_fixed_header, qos, QoS};

/// MQTT v4 codec
#[derive(Debug, Clone)]
pub struct Codec {
    /// Maximum packet size allowed by client
    pub max_incoming_size: usize,
    /// Maximum packet size allowed by broker
    pub max_outgoing_size: usize,
    /// edgegate patch: payload bytes of an oversized PUBLISH still to be skipped.
    pub skipping: usize,
}

impl Decoder for Codec {
    type Item = Packet;
    type Error = Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, Self::Error> {
        if self.skipping > 0 {
            let n = self.skipping.min(src.len());
            src.advance(n);
            self.skipping -= n;
            if self.skipping > 0 {
                return Ok(None);
            }
        }
        match Packet::read(src, self.max_incoming_size) {
            Ok(packet) => Ok(Some(packet)),
            Err(Error::InsufficientBytes(b)) => {
                // Get more packets to construct the incomplete packet
                src.reserve(b);
                Ok(None)
            }
            Err(Error::PayloadSizeLimitExceeded(_)) => self.oversized_publish(src),
            Err(e) => Err(e),
        }
    }
}

impl Codec {
    /// edgegate patch: a PUBLISH over `max_incoming_size` is yielded as
    /// [`Packet::OversizedPublish`] once its topic and packet id arrived; its payload is skipped as
    /// it streams in, so memory stays bounded. Before, the connection failed, and the broker
    /// resent the same message first on every reconnect. Other oversized packets still fail.
    fn oversized_publish(&mut self, src: &mut BytesMut) -> Result<Option<Packet>, Error> {
        let header = parse_fixed_header(src.iter())?;
        if header.packet_type()? != PacketType::Publish {
            return Err(Error::PayloadSizeLimitExceeded(header.remaining_len));
        }
        let fixed_len = header.fixed_header_len;
        if src.len() < fixed_len + 2 {
            src.reserve(fixed_len + 2 - src.len());
            return Ok(None);
        }
        let topic_len = u16::from_be_bytes([src[fixed_len], src[fixed_len + 1]]) as usize;
        let pkid_len = match qos((header.byte1 & 0b0110) >> 1)? {
            QoS::AtMostOnce => 0,
            QoS::AtLeastOnce | QoS::ExactlyOnce => 2,
        };
        let variable_len = 2 + topic_len + pkid_len;
        if variable_len > header.remaining_len {
            return Err(Error::MalformedPacket);
        }
        if src.len() < fixed_len + variable_len {
            src.reserve(fixed_len + variable_len - src.len());
            return Ok(None);
        }
        let head = src.split_to(fixed_len + variable_len).freeze();
        let publish = Publish::read(
            FixedHeader::new(header.byte1, fixed_len - 1, variable_len),
            head,
        )?;
        let payload_len = header.remaining_len - variable_len;
        let now = payload_len.min(src.len());
        src.advance(now);
        self.skipping = payload_len - now;
        Ok(Some(Packet::OversizedPublish {
            publish,
            payload_len,
        }))
    }
}

impl Encoder<Packet> for Codec {
    type Error = Error;

    fn encode(&mut self, item: Packet, dst: &mut BytesMut) -> Result<(), Self::Error> {
        item.write(dst, self.max_outgoing_size)?;

        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use tokio_util::codec::Encoder;

    use super::Codec;
    use crate::{mqttbytes::Error, Packet, Publish, QoS};

    #[test]
    fn outgoing_max_packet_size_check() {
        let mut buf = BytesMut::new();
        let mut codec = Codec {
            max_incoming_size: 100,
            max_outgoing_size: 200,
            skipping: 0,
        };

        let mut small_publish = Publish::new("hello/world", QoS::AtLeastOnce, vec![1; 100]);
        small_publish.pkid = 1;
        codec
            .encode(Packet::Publish(small_publish), &mut buf)
            .unwrap();

        let large_publish = Publish::new("hello/world", QoS::AtLeastOnce, vec![1; 265]);
        match codec.encode(Packet::Publish(large_publish), &mut buf) {
            Err(Error::OutgoingPacketTooLarge {
                pkt_size: 281,
                max: 200,
            }) => {}
            _ => unreachable!(),
        }
    }
}
