//! MQTT topic templates of downlink routes: `devices/${deviceName}/rpc`, filled from the encoder
//! output's metadata.

use std::collections::BTreeMap;

/// A parsed topic template: literal text and `${key}` placeholders, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(Vec<Part>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Key(String),
}

impl Template {
    /// `Err` says what is wrong, for `check` to print under the route's `topic` key.
    pub fn parse(text: &str) -> Result<Template, String> {
        if text.is_empty() {
            return Err("must not be empty".into());
        }
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            if start > 0 {
                parts.push(Part::Text(rest[..start].to_owned()));
            }
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| format!("unclosed \"${{\" in {text:?}"))?;
            let key = &after[..end];
            if key.is_empty() || key.contains("${") {
                return Err(format!("empty or nested placeholder in {text:?}"));
            }
            parts.push(Part::Key(key.to_owned()));
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        let literal: String = parts
            .iter()
            .filter_map(|p| match p {
                Part::Text(t) => Some(t.as_str()),
                Part::Key(_) => None,
            })
            .collect();
        if literal.contains(['+', '#', '\0']) {
            return Err(format!(
                "{text:?}: a topic to publish to cannot hold the wildcards + or #"
            ));
        }
        Ok(Template(parts))
    }

    /// The topic for one message; `Err` names the first key the metadata lacks, or a value that
    /// would make the topic invalid. Never a topic with a literal `${…}` in it.
    pub fn fill(&self, metadata: &BTreeMap<String, String>) -> Result<String, String> {
        let mut topic = String::new();
        for part in &self.0 {
            match part {
                Part::Text(t) => topic.push_str(t),
                Part::Key(k) => {
                    let value = metadata
                        .get(k)
                        .ok_or_else(|| format!("topic template: metadata has no {k:?}"))?;
                    if value.is_empty() || value.contains(['+', '#', '\0']) {
                        return Err(format!(
                            "topic template: metadata {k:?} = {value:?} cannot be part of a topic"
                        ));
                    }
                    topic.push_str(value);
                }
            }
        }
        if topic.len() > usize::from(u16::MAX) {
            return Err("topic template: the topic is longer than 65535 bytes".into());
        }
        Ok(topic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn placeholders_are_filled_from_the_metadata() {
        let t = Template::parse("devices/${deviceName}/rpc/${id}").unwrap();
        let m = meta(&[("deviceName", "pump-1"), ("id", "7")]);
        assert_eq!(t.fill(&m).unwrap(), "devices/pump-1/rpc/7");
        assert_eq!(Template::parse("plain").unwrap().fill(&m).unwrap(), "plain");
    }

    #[test]
    fn a_missing_key_is_an_error_not_a_literal_topic() {
        let t = Template::parse("devices/${deviceName}/rpc").unwrap();
        let e = t.fill(&meta(&[("other", "x")])).unwrap_err();
        assert!(e.contains("deviceName"), "{e}");
        let e = t.fill(&meta(&[("deviceName", "a/+")])).unwrap_err();
        assert!(e.contains("cannot be part"), "{e}");
    }

    #[test]
    fn malformed_templates_are_refused() {
        for bad in ["", "a/${x", "a/${}/b", "a/+/b", "a/#"] {
            assert!(Template::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
