//! `/metrics`: the counters the service keeps anyway (read at scrape time) and the
//! histograms kept for the operator, written in the Prometheus text format by
//! `prometheus-client`.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::ConstCounter,
        gauge::ConstGauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use super::{EventService, Metrics};

/// Histograms the publisher and the hub fill.
#[derive(Debug)]
pub(super) struct Instruments {
    /// From a publish reaching the service to its answer (stored and dispatched).
    pub publish_seconds: Histogram,
    /// Events stored per transaction (group commit).
    pub commit_batch: Histogram,
}

impl Default for Instruments {
    fn default() -> Self {
        Self {
            // 0.1 ms to ~3.3 s.
            publish_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            // 1 to 2,048 events.
            commit_batch: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
        }
    }
}

impl EventService {
    /// The whole `/metrics` page.
    pub fn encode_metrics(&self) -> String {
        let mut registry = Registry::with_prefix("nomey_sse");
        registry.register_collector(Box::new(Snapshot(self.metrics())));
        let instruments = &self.inner.instruments;
        registry.register(
            "publish_duration_seconds",
            "Time from a publish reaching the service to its answer: stored, then dispatched",
            instruments.publish_seconds.clone(),
        );
        registry.register(
            "commit_batch_events",
            "Events stored per transaction (group commit)",
            instruments.commit_batch.clone(),
        );
        registry.register(
            "cutoff_queued_bytes",
            "Bytes a stream had waiting when it was cut off as too slow",
            self.hub().metrics().queued_at_cutoff.clone(),
        );
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
        out
    }
}

/// A labelled counter family: name, help, label, (label value, count)s.
type Family<'a> = (&'a str, &'a str, &'a str, &'a [(&'a str, u64)]);

/// The counters, as read at the scrape.
#[derive(Debug)]
struct Snapshot(Metrics);

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = &self.0;
        let gauge = ConstGauge::new(m.open_streams as i64);
        gauge.encode(encoder.encode_descriptor(
            "open_streams",
            "Streams open on this instance",
            None,
            gauge.metric_type(),
        )?)?;
        let counters = [
            (
                "connections",
                "Streams opened on this instance",
                m.connections,
            ),
            (
                "events_published",
                "Events stored and dispatched by this instance",
                m.events_published,
            ),
            (
                "publish_failures",
                "Publishes refused because the event could not be stored or the service was stopping",
                m.publish_failures,
            ),
            (
                "events_written",
                "Stored events handed to connections",
                m.events_written,
            ),
            (
                "frames_written",
                "Frames (events and heartbeats) handed to connections",
                m.frames_written,
            ),
            (
                "unreadable_filters",
                "Stored events whose filter could not be read, delivered to no one",
                m.unreadable_filters,
            ),
            (
                "history_rows_read",
                "Event-log rows read for replay and pending delivery",
                m.history_rows_read,
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        let families: [Family; 2] = [
            (
                "clients_dropped",
                "Streams cut off by the server",
                "reason",
                &[
                    ("slow", m.dropped_slow),
                    ("stale", m.dropped_stale),
                    ("behind", m.dropped_behind),
                    ("orphaned", m.dropped_orphaned),
                ],
            ),
            (
                "unsaved_dropped",
                "Records not kept while the database was away: ended sessions (kept as counts) and settlements",
                "kind",
                &[
                    ("session", m.unsaved_sessions_dropped),
                    ("settlement", m.unsaved_settlements_dropped),
                ],
            ),
        ];
        for (name, help, label, samples) in families {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (value, count) in samples {
                let labels = [(label, *value)];
                ConstCounter::new(*count).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
