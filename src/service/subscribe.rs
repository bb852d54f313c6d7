//! Opening a stream: register with the hub, read the history up to the hub's cursor,
//! then hand back the response body.

use std::collections::BTreeMap;

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{EventService, SubscribeError, history, stream::ClientStream};
use crate::{
    event::{self, now_millis},
    filter::ClientInfo,
    hub::RegisterError,
};

/// Who is opening a stream, and from where it resumes.
#[derive(Debug, Default)]
pub struct Subscribe {
    pub user_id: Option<String>,
    pub session_id: Option<String>,
    pub metadata: BTreeMap<String, String>,
    /// `Last-Event-ID`, if the client is resuming.
    pub last_event_id: Option<i64>,
    /// Cancels the connection; fired when the hub cuts the stream off.
    pub kill: CancellationToken,
}

/// The `connected` event's data.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Connected<'a> {
    client_id: Uuid,
    user_id: Option<&'a str>,
    session_id: Option<&'a str>,
    server_time: String,
    history_gap: bool,
}

impl EventService {
    /// Opens a stream: `retry:`, `connected`, then the replay or pending events, then live
    /// ones, with none missing and none twice.
    pub async fn subscribe(&self, request: Subscribe) -> Result<ClientStream, SubscribeError> {
        let config = self.config();
        let info = ClientInfo {
            client_id: Uuid::new_v4(),
            user_id: request.user_id,
            session_id: request.session_id,
            metadata: request.metadata,
            connected_at: now_millis(),
        };
        // Registered before the history is read, so nothing published meanwhile is lost.
        let registration =
            self.hub()
                .register(info, request.kill)
                .map_err(|error| match error {
                    RegisterError::Full => SubscribeError::Full(config.max_clients),
                    RegisterError::UserFull => {
                        SubscribeError::UserFull(config.max_streams_per_user)
                    }
                    RegisterError::Closed => SubscribeError::ShuttingDown,
                })?;
        let (history, history_gap) = history::open(
            self,
            registration.client.clone(),
            request.last_event_id,
            registration.cursor,
        )
        .await?;

        let info = &registration.client.info;
        let connected = Connected {
            client_id: info.client_id,
            user_id: info.user_id.as_deref(),
            session_id: info.session_id.as_deref(),
            server_time: event::rfc3339(std::time::SystemTime::now()),
            history_gap,
        };
        // Strings, a UUID and a bool always serialize.
        let connected = serde_json::to_string(&connected).unwrap_or_default();
        let opening = vec![
            event::encode_retry(config.retry),
            event::encode_unstored("connected", &connected),
        ];
        Ok(ClientStream::new(
            self.clone(),
            registration,
            opening,
            history,
            config.max_stream_duration,
            request.last_event_id,
        ))
    }
}
