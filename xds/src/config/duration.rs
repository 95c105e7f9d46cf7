//! Human-readable durations in config files (`"250ms"`, `"15s"`, `"1m 30s"`).

use serde::{Deserialize, Deserializer};
use std::time::Duration;

/// A duration written as text in YAML, parsed with `humantime` so `"1s"`, `"500ms"` and
/// `"2m"` all work; a bare number is rejected because its unit would be a guess.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(text.trim())
            .map(HumanDuration)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration {text:?}: {e} (write it like \"250ms\" or \"5s\")"
                ))
            })
    }
}

impl From<HumanDuration> for Duration {
    fn from(value: HumanDuration) -> Self {
        value.0
    }
}
