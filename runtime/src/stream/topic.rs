//! Where replies go: a topic template, and the guard that keeps the stream
//! from predicting on its own replies.

use super::core::StreamError;

/// The reply topic for a message that names no MQTT 5 response topic.
///
/// A template where `{topic}` stands for the input topic
/// (`{topic}/prediction`, the default, or `predictions/{topic}`), or a fixed
/// topic without it (`models/bc/predictions`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputTopic {
    /// Text before and after `{topic}`; `None` for a fixed topic.
    around: Option<(String, String)>,
    fixed: String,
}

impl Default for OutputTopic {
    fn default() -> Self {
        OutputTopic { around: Some((String::new(), "/prediction".into())), fixed: String::new() }
    }
}

impl std::fmt::Display for OutputTopic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.around {
            Some((before, after)) => write!(f, "{before}{{topic}}{after}"),
            None => f.write_str(&self.fixed),
        }
    }
}

impl std::str::FromStr for OutputTopic {
    type Err = StreamError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        OutputTopic::parse(s)
    }
}

impl OutputTopic {
    pub fn parse(template: &str) -> Result<OutputTopic, StreamError> {
        let bad = |why: &str| StreamError::Config(format!("output topic {template:?}: {why}"));
        if template.is_empty() {
            return Err(bad("empty"));
        }
        if template.contains(['+', '#', '\0']) {
            return Err(bad("a topic to publish to cannot hold wildcards (+, #)"));
        }
        match template.split_once("{topic}") {
            Some((before, after)) => {
                if after.contains("{topic}") {
                    return Err(bad("{topic} may appear once"));
                }
                if before.is_empty() && after.is_empty() {
                    return Err(bad("replying on the input topic itself would feed every reply back in"));
                }
                Ok(OutputTopic { around: Some((before.into(), after.into())), fixed: String::new() })
            }
            None => Ok(OutputTopic { around: None, fixed: template.into() }),
        }
    }

    /// The reply topic for a message that came in on `input`.
    pub fn topic_for(&self, input: &str) -> String {
        match &self.around {
            Some((before, after)) => {
                let mut t = String::with_capacity(before.len() + input.len() + after.len());
                t.push_str(before);
                t.push_str(input);
                t.push_str(after);
                t
            }
            None => self.fixed.clone(),
        }
    }

    /// Whether `topic` is one this stream publishes replies to. An input
    /// filter like `sensors/#` also matches `sensors/7/reading/prediction`;
    /// predicting on a reply would reply to the reply, forever.
    pub fn is_reply_topic(&self, topic: &str) -> bool {
        match &self.around {
            Some((before, after)) => {
                topic.len() > before.len() + after.len() && topic.starts_with(before.as_str()) && topic.ends_with(after.as_str())
            }
            None => topic == self.fixed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates() {
        let t = OutputTopic::default();
        assert_eq!(t.to_string(), "{topic}/prediction");
        assert_eq!(t.topic_for("sensors/7/reading"), "sensors/7/reading/prediction");
        assert!(t.is_reply_topic("sensors/7/reading/prediction"));
        assert!(!t.is_reply_topic("sensors/7/reading"));
        let f = OutputTopic::parse("out/p").unwrap();
        assert_eq!(f.topic_for("a/b"), "out/p");
        assert!(f.is_reply_topic("out/p"));
        let p = OutputTopic::parse("predictions/{topic}").unwrap();
        assert_eq!(p.topic_for("a/b"), "predictions/a/b");
        assert!(OutputTopic::parse("{topic}").is_err());
        assert!(OutputTopic::parse("out/+").is_err());
        assert!(OutputTopic::parse("").is_err());
    }
}
