//! The Shuttle entry point (`cargo shuttle deploy`, `shuttle run`): Shuttle provides the
//! Postgres database and the secrets, which carry the service's variables by name.

use nomey_sse::{shuttle::ShuttleService, startup::connect_store, telemetry};
use shuttle_runtime::{SecretStore, Secrets};

// jemalloc: see its entry in Cargo.toml.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[shuttle_runtime::main]
async fn main(
    #[shuttle_shared_db::Postgres(local_uri = "{secrets.LOCAL_DATABASE_URL}")] database_url: String,
    #[Secrets] secrets: SecretStore,
) -> Result<ShuttleService, shuttle_runtime::Error> {
    let config = ShuttleService::config(secrets, database_url)
        .map_err(|error| anyhow::anyhow!("{error}"))?;
    telemetry::init(config.enable_logging, config.log_json);
    let store = connect_store(&config.database).await;
    Ok(ShuttleService::new(config, store))
}
