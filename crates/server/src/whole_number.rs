//! Counts in request bodies: JSON Schema's `integer` includes `5.0`, which serde's `usize`
//! refuses; these accept any whole number in range and refuse fractions by name.

use serde::{Deserialize, Deserializer};

/// An optional count (or seed) given as `5` or `5.0`.
pub fn optional<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    let Some(value) = Option::<serde_json::Number>::deserialize(deserializer)? else {
        return Ok(None);
    };
    let whole = if let Some(n) = value.as_u64() {
        Some(n)
    } else {
        value
            .as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < u64::MAX as f64)
            .map(|f| f as u64)
    };
    match whole.and_then(|n| T::try_from(n).ok()) {
        Some(n) => Ok(Some(n)),
        None => Err(serde::de::Error::custom(format!(
            "expected a whole number ≥ 0, got {value}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    #[derive(Debug, serde::Deserialize)]
    struct Body {
        #[serde(default, deserialize_with = "super::optional")]
        top: Option<usize>,
    }

    fn top(json: &str) -> Result<Option<usize>, serde_json::Error> {
        serde_json::from_str::<Body>(json).map(|b| b.top)
    }

    #[test]
    fn whole_numbers_in_either_spelling() {
        assert_eq!(top("{\"top\": 5}").ok(), Some(Some(5)));
        assert_eq!(top("{\"top\": 5.0}").ok(), Some(Some(5)));
        assert_eq!(top("{}").ok(), Some(None));
        assert_eq!(top("{\"top\": null}").ok(), Some(None));
        assert!(top("{\"top\": 2.5}").is_err());
        assert!(top("{\"top\": -1}").is_err());
    }
}
