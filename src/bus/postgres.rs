//! The Postgres bus: `LISTEN` on the channel that every publishing transaction notifies
//! once, at commit, with the batch's id range.

use sqlx::postgres::PgListener;

use super::{Bus, Wake};
use crate::store::ANNOUNCE_CHANNEL;

/// Listens on its own connection (not one of the pool's).
pub struct PgBus {
    url: String,
    listener: Option<PgListener>,
}

impl PgBus {
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            listener: None,
        }
    }

    async fn connect(&self) -> Result<PgListener, sqlx::Error> {
        let mut listener = PgListener::connect(&self.url).await?;
        // Reconnection is ours, so that a lost connection is always followed by a resync.
        listener.eager_reconnect(false);
        listener.listen(ANNOUNCE_CHANNEL).await?;
        Ok(listener)
    }
}

impl Bus for PgBus {
    async fn next(&mut self) -> Result<Wake, sqlx::Error> {
        let Some(listener) = &mut self.listener else {
            // Listening before the resync reads the log: nothing falls in between.
            self.listener = Some(self.connect().await?);
            return Ok(Wake::Resync);
        };
        match listener.try_recv().await {
            Ok(Some(notification)) => {
                Ok(parse(notification.payload()).map_or(Wake::Resync, Wake::Committed))
            }
            // The connection closed: announcements may be lost until we listen again.
            Ok(None) => {
                self.listener = None;
                Ok(Wake::Resync)
            }
            Err(error) => {
                self.listener = None;
                Err(error)
            }
        }
    }
}

/// `<first>:<last>` → last.
fn parse(payload: &str) -> Option<i64> {
    payload.split_once(':')?.1.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn payloads_name_the_last_id_of_the_batch() {
        assert_eq!(super::parse("41:57"), Some(57));
        assert_eq!(super::parse("57"), None);
        assert_eq!(super::parse("a:b"), None);
    }
}
