//! The field names, numbers and message types of every xDS message NIP knows, as a static
//! table generated (`xds/generated/`, by `xds/descriptors`) from the same `.proto` files as [`crate::json`]'s
//! descriptors. Walking an encoded resource with it costs no heap: the table lives in the
//! binary's read-only data, and only the pages looked at are ever loaded — unlike a
//! decoded descriptor pool (~15 MB resident), which a proxy must not hold just to check
//! every config it receives.

/// One message type.
#[derive(Debug)]
pub struct MessageSchema {
    /// Full name, e.g. `envoy.config.route.v3.RouteAction`.
    pub name: &'static str,
    /// A map's entry type (`key` = 1, `value` = 2).
    pub map_entry: bool,
    /// Its fields.
    pub fields: &'static [FieldSchema],
}

/// One field.
#[derive(Debug)]
pub struct FieldSchema {
    /// Field number.
    pub number: i32,
    /// Field name.
    pub name: &'static str,
    /// The message type of a message field (empty otherwise).
    pub message: &'static str,
    /// A repeated field.
    pub repeated: bool,
}

include!("../generated/message_schemas.rs");

/// The schema of message type `name`.
pub fn message(name: &str) -> Option<&'static MessageSchema> {
    MESSAGES
        .binary_search_by(|m| m.name.cmp(name))
        .ok()
        .map(|i| &MESSAGES[i])
}

impl MessageSchema {
    /// The field with `number`.
    pub fn field(&self, number: i32) -> Option<&'static FieldSchema> {
        self.fields.iter().find(|f| f.number == number)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_schema_knows_route_actions() {
        let action = super::message("envoy.config.route.v3.RouteAction").expect("compiled in");
        let retry = action
            .fields
            .iter()
            .find(|f| f.name == "retry_policy")
            .unwrap();
        assert_eq!(retry.message, "envoy.config.route.v3.RetryPolicy");
        assert!(!retry.repeated);
        let entry = super::message("envoy.config.route.v3.Route.TypedPerFilterConfigEntry")
            .expect("map entries are listed");
        assert!(entry.map_entry);
    }
}
