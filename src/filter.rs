//! Who an event is for, and who a stream is: a filter is matched against a client.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::openapi::{
    KnownFormat, ObjectBuilder, RefOr, Schema, SchemaFormat, Type,
    schema::{AdditionalProperties, ArrayBuilder},
};
use uuid::Uuid;

/// Who a stream belongs to, as given when it connected.
#[derive(Clone, Debug)]
pub struct ClientInfo {
    pub client_id: Uuid,
    pub user_id: Option<String>,
    pub session_id: Option<String>,
    pub metadata: BTreeMap<String, String>,
    /// Unix milliseconds.
    pub connected_at: i64,
}

/// Audience keys (see [`Filter::audience`]).
const BROADCAST: &str = "*";
const SCANNED: &str = "x";
const CLIENT_IDS: &str = "c";

impl ClientInfo {
    /// The audience keys of every stored event this client could match.
    pub fn audiences(&self) -> Vec<String> {
        let mut keys = vec![BROADCAST.to_owned(), SCANNED.to_owned()];
        keys.extend(self.user_id.as_ref().map(|u| format!("u:{u}")));
        keys.extend(self.session_id.as_ref().map(|s| format!("s:{s}")));
        keys
    }
}

/// A target: every given field must match (AND). `None` fields are not constraints.
///
/// This is both the `filter` object of `POST /api/sse/notify` and what the event log
/// stores, so replay applies exactly the rule live delivery applied.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    rename_all = "camelCase",
    deny_unknown_fields,
    try_from = "FilterObject"
)]
pub struct Filter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_ids: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ids: Option<Vec<Uuid>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
}

/// The filter as the API describes it: at least one field, none of them null.
impl utoipa::PartialSchema for Filter {
    fn schema() -> RefOr<Schema> {
        let list = |items: RefOr<Schema>| {
            ArrayBuilder::new()
                .items(items)
                .min_items(Some(1))
                .max_items(Some(MAX_FILTER_IDS))
        };
        let uuid = ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Uuid)));
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .property("userId", Id::schema())
            .property("userIds", list(Id::schema()))
            .property("sessionId", Id::schema())
            .property("clientIds", list(uuid.into()))
            .property("metadata", Metadata::schema())
            .additional_properties(Some(AdditionalProperties::FreeForm(false)))
            .min_properties(Some(1))
            .description(Some(
                "Who an event is for: every given field must match. At least one field.",
            ))
            .into()
    }
}

impl utoipa::ToSchema for Filter {}

/// A user id, session id or metadata value, as the API describes it.
struct Id;

impl utoipa::PartialSchema for Id {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
            .max_length(Some(MAX_VALUE_BYTES))
            .into()
    }
}

impl utoipa::ToSchema for Id {}

/// Metadata pairs, as the API describes them.
struct Metadata;

impl utoipa::PartialSchema for Metadata {
    fn schema() -> RefOr<Schema> {
        let key = ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(METADATA_KEY_PATTERN))
            .min_length(Some(1))
            .max_length(Some(MAX_KEY_BYTES));
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .property_names(Some(key))
            .additional_properties(Some(Id::schema()))
            .min_properties(Some(1))
            .max_properties(Some(MAX_METADATA_PAIRS))
            .into()
    }
}

impl utoipa::ToSchema for Metadata {}

/// What `check_metadata_key` allows, for the API description.
pub const METADATA_KEY_PATTERN: &str = "^[A-Za-z0-9_.-]{1,64}$";

/// A filter as JSON: only an object. (serde would also take an array for a struct, field
/// by field, so `["u1"]` would become a `userId` filter.)
#[derive(Deserialize)]
struct FilterObject(serde_json::Map<String, serde_json::Value>);

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FilterFields {
    #[serde(default)]
    user_id: Option<String>,
    #[serde(default)]
    user_ids: Option<Vec<String>>,
    #[serde(default)]
    session_id: Option<String>,
    #[serde(default)]
    client_ids: Option<Vec<Uuid>>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
}

impl TryFrom<FilterObject> for Filter {
    type Error = serde_json::Error;

    fn try_from(FilterObject(object): FilterObject) -> Result<Self, Self::Error> {
        if let Some((name, _)) = object.iter().find(|(_, value)| value.is_null()) {
            return Err(serde::de::Error::custom(format!("{name} may not be null")));
        }
        let f: FilterFields = serde_json::from_value(serde_json::Value::Object(object))?;
        Ok(Self {
            user_id: f.user_id,
            user_ids: f.user_ids,
            session_id: f.session_id,
            client_ids: f.client_ids,
            metadata: f.metadata,
        })
    }
}

/// Most users one filter may name, and most client ids: a bound on the work of one publish.
pub const MAX_FILTER_IDS: usize = 1000;
/// Longest user id, session id or metadata value, in bytes (UTF-8).
pub const MAX_VALUE_BYTES: usize = 256;
/// Longest metadata key, in bytes.
pub const MAX_KEY_BYTES: usize = 64;
/// Most metadata pairs a stream may carry.
pub const MAX_METADATA_PAIRS: usize = 16;

/// A user id, session id or metadata value: 1 to 256 bytes. The same rule holds for
/// streams and for filters, so no event waits for a user who could never connect.
pub fn check_id(value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > MAX_VALUE_BYTES {
        return Err(format!("1 to {MAX_VALUE_BYTES} bytes"));
    }
    Ok(())
}

/// A metadata key: 1 to 64 characters of `[A-Za-z0-9_.-]`.
pub fn check_metadata_key(key: &str) -> Result<(), String> {
    let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    if key.is_empty() || key.len() > MAX_KEY_BYTES || !key.chars().all(valid) {
        return Err(format!("1 to {MAX_KEY_BYTES} characters of [A-Za-z0-9_.-]"));
    }
    Ok(())
}

impl Filter {
    pub fn user(user_id: impl Into<String>) -> Self {
        Self {
            user_id: Some(user_id.into()),
            ..Self::default()
        }
    }

    pub fn metadata<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        let pairs = pairs
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        Self {
            metadata: Some(pairs),
            ..Self::default()
        }
    }

    /// An empty filter (or one of empty lists) would broadcast by mistake, so it is refused.
    pub fn validate(&self) -> Result<(), String> {
        let any_given = self.user_id.is_some()
            || self.session_id.is_some()
            || self.user_ids.as_ref().is_some_and(|ids| !ids.is_empty())
            || self.client_ids.as_ref().is_some_and(|ids| !ids.is_empty())
            || self.metadata.as_ref().is_some_and(|m| !m.is_empty());
        if !any_given {
            return Err(
                "filter needs at least one of userId, userIds, sessionId, clientIds, metadata"
                    .into(),
            );
        }
        // An empty list or object would match no one (or, read loosely, everyone).
        if self.user_ids.as_ref().is_some_and(Vec::is_empty)
            || self.client_ids.as_ref().is_some_and(Vec::is_empty)
            || self.metadata.as_ref().is_some_and(BTreeMap::is_empty)
        {
            return Err("userIds, clientIds and metadata, when given, must not be empty".into());
        }
        let too_many = |len: Option<usize>| len.is_some_and(|n| n > MAX_FILTER_IDS);
        if too_many(self.user_ids.as_ref().map(Vec::len))
            || too_many(self.client_ids.as_ref().map(Vec::len))
        {
            return Err(format!(
                "userIds and clientIds take at most {MAX_FILTER_IDS} entries"
            ));
        }
        let ids = self.user_id.iter().chain(self.session_id.iter());
        for id in ids.chain(self.user_ids.iter().flatten()) {
            check_id(id).map_err(|rule| format!("filter ids: {rule}"))?;
        }
        if let Some(metadata) = &self.metadata {
            if metadata.len() > MAX_METADATA_PAIRS {
                return Err(format!(
                    "filter metadata: at most {MAX_METADATA_PAIRS} pairs"
                ));
            }
            for (key, value) in metadata {
                check_metadata_key(key).map_err(|rule| format!("filter metadata key: {rule}"))?;
                check_id(value).map_err(|rule| format!("filter metadata value: {rule}"))?;
            }
        }
        Ok(())
    }

    pub fn matches(&self, client: &ClientInfo) -> bool {
        let user = client.user_id.as_deref();
        self.user_id.as_deref().is_none_or(|u| user == Some(u))
            && self
                .user_ids
                .as_ref()
                .is_none_or(|ids| user.is_some_and(|u| ids.iter().any(|id| id == u)))
            && self
                .session_id
                .as_deref()
                .is_none_or(|s| client.session_id.as_deref() == Some(s))
            && self
                .client_ids
                .as_ref()
                .is_none_or(|ids| ids.contains(&client.client_id))
            && self
                .metadata
                .as_ref()
                .is_none_or(|m| m.iter().all(|(k, v)| client.metadata.get(k) == Some(v)))
    }

    /// The key under which the event log indexes an event for replay. Each key comes from
    /// a field that every matching client shares, so a resuming client reads only the rows
    /// filed under its own keys (see [`ClientInfo::audiences`]). Filters that name several
    /// users, or only metadata, share one key that every replay scans.
    pub fn audience(filter: Option<&Self>) -> String {
        let Some(filter) = filter else {
            return BROADCAST.into();
        };
        if filter.client_ids.is_some() {
            // A resuming stream has a new client id: such events are never replayed.
            CLIENT_IDS.into()
        } else if let Some(user) = &filter.user_id {
            format!("u:{user}")
        } else if filter.user_ids.is_some() {
            SCANNED.into()
        } else if let Some(session) = &filter.session_id {
            format!("s:{session}")
        } else {
            SCANNED.into()
        }
    }

    /// The users this event is addressed to, if it names any: they get it as a pending
    /// notification when they have no open stream.
    pub fn target_users(&self) -> Vec<String> {
        match (&self.user_id, &self.user_ids) {
            (Some(user), Some(ids)) if !ids.contains(user) => Vec::new(),
            (Some(user), _) => vec![user.clone()],
            (None, Some(ids)) => {
                let mut ids = ids.clone();
                ids.sort();
                ids.dedup();
                ids
            }
            (None, None) => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(user: &str, session: &str, meta: &[(&str, &str)]) -> ClientInfo {
        ClientInfo {
            client_id: Uuid::new_v4(),
            user_id: Some(user.into()),
            session_id: Some(session.into()),
            metadata: meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            connected_at: 0,
        }
    }

    #[test]
    fn every_given_field_must_match() {
        let admin = client("u1", "s1", &[("role", "admin"), ("team", "a")]);
        let filter: Filter =
            serde_json::from_str(r#"{"userIds":["u1","u2"],"metadata":{"role":"admin"}}"#).unwrap();
        assert!(filter.matches(&admin));
        assert!(!filter.matches(&client("u3", "s1", &[("role", "admin")])));
        assert!(!filter.matches(&client("u1", "s1", &[("role", "user")])));
        assert!(
            Filter {
                session_id: Some("s1".into()),
                ..Filter::default()
            }
            .matches(&admin)
        );
        let by_id = Filter {
            client_ids: Some(vec![admin.client_id]),
            ..Filter::default()
        };
        assert!(by_id.matches(&admin));
        assert!(!by_id.matches(&client("u1", "s1", &[])));
    }

    #[test]
    fn empty_and_unknown_filters_are_refused() {
        assert!(Filter::default().validate().is_err());
        assert!(
            Filter {
                user_ids: Some(vec![]),
                ..Filter::default()
            }
            .validate()
            .is_err()
        );
        assert!(serde_json::from_str::<Filter>(r#"{"user":"u1"}"#).is_err());
        assert!(serde_json::from_str::<Filter>(r#"{"userId":1}"#).is_err());
        assert!(serde_json::from_str::<Filter>(r#"{"clientIds":["not-a-uuid"]}"#).is_err());
        assert!(serde_json::from_str::<Filter>(r#"["u1"]"#).is_err());
        assert!(Filter::user("").validate().is_err());
        assert!(Filter::user("x".repeat(257)).validate().is_err());
        assert!(Filter::metadata([("bad key", "v")]).validate().is_err());
        assert!(Filter::metadata([("k", "")]).validate().is_err());
    }

    #[test]
    fn target_users_are_the_intersection_of_user_fields() {
        assert_eq!(Filter::user("u1").target_users(), ["u1"]);
        let both = Filter {
            user_id: Some("u1".into()),
            user_ids: Some(vec!["u2".into()]),
            ..Filter::default()
        };
        assert!(both.target_users().is_empty());
        assert!(Filter::metadata([("a", "b")]).target_users().is_empty());
    }

    #[test]
    fn a_matching_client_always_holds_the_audience_key_of_the_event() {
        let admin = client("u1", "s1", &[("role", "admin")]);
        let filters = [
            r#"{"userId":"u1"}"#,
            r#"{"userId":"u1","sessionId":"s1"}"#,
            r#"{"userIds":["u1","u2"]}"#,
            r#"{"sessionId":"s1"}"#,
            r#"{"metadata":{"role":"admin"}}"#,
        ];
        let keys = admin.audiences();
        for json in filters {
            let filter: Filter = serde_json::from_str(json).unwrap();
            assert!(filter.matches(&admin), "{json}");
            assert!(keys.contains(&Filter::audience(Some(&filter))), "{json}");
        }
        assert!(keys.contains(&Filter::audience(None)));
        assert!(!keys.contains(&Filter::audience(Some(&Filter::user("u2")))));
    }

    proptest::proptest! {
        #[test]
        fn any_json_makes_a_filter_or_an_error_never_a_panic(raw in "[ -~]{0,60}") {
            let _ = serde_json::from_str::<Filter>(&raw);
        }

        #[test]
        fn a_matching_client_holds_the_audience_key_of_any_valid_filter(
            user in proptest::option::of("[a-c]"),
            users in proptest::option::of(proptest::collection::vec("[a-c]", 1..3)),
            session in proptest::option::of("[x-y]"),
            role in proptest::option::of("[r-s]"),
            client_user in proptest::option::of("[a-c]"),
            client_session in proptest::option::of("[x-y]"),
            client_role in proptest::option::of("[r-s]"),
        ) {
            let filter = Filter {
                user_id: user,
                user_ids: users,
                session_id: session,
                client_ids: None,
                metadata: role.map(|r| BTreeMap::from([("role".to_owned(), r)])),
            };
            let client = ClientInfo {
                client_id: Uuid::new_v4(),
                user_id: client_user,
                session_id: client_session,
                metadata: client_role.map(|r| BTreeMap::from([("role".to_owned(), r)])).unwrap_or_default(),
                connected_at: 0,
            };
            if filter.validate().is_ok() && filter.matches(&client) {
                proptest::prop_assert!(client.audiences().contains(&Filter::audience(Some(&filter))));
            }
        }
    }
}
