//! Which Postgres server the tests create their databases on: `TEST_POSTGRES_URL`, else
//! one on 127.0.0.1:5432, else a throwaway cluster of our own, started once from the
//! installed server binaries and shared by every test process.

use std::{
    fs::File,
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::Duration,
};

const DEFAULT: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The admin URL of the server the tests use.
pub fn admin_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var("TEST_POSTGRES_URL") {
            return url;
        }
        if answers(5432) {
            return DEFAULT.to_owned();
        }
        let port = own_cluster();
        format!("postgres://postgres@127.0.0.1:{port}/postgres")
    })
    .clone()
}

fn answers(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

/// Starts (or finds already started) the tests' own cluster; returns its port.
fn own_cluster() -> u16 {
    let bin = server_binaries().unwrap_or_else(|| {
        panic!(
            "the Postgres tests need a server: set TEST_POSTGRES_URL, run one on 127.0.0.1:5432, \
             or install PostgreSQL's server binaries (Debian: apt-get install postgresql) so that \
             the tests can start their own"
        )
    });
    let dir = std::env::temp_dir().join("nomey-sse-test-postgres");
    // One process starts it; the others wait here, then find it running.
    let lock = File::create(std::env::temp_dir().join("nomey-sse-test-postgres.lock"))
        .expect("create the cluster's lock file");
    lock.lock().expect("lock the cluster");
    let port_file = dir.join("port");
    if let Some(port) = std::fs::read_to_string(&port_file)
        .ok()
        .and_then(|p| p.trim().parse().ok())
        && answers(port)
    {
        return port;
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the cluster's directory");
    // The server refuses to run as root: hand the directory to the postgres user.
    let as_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if as_root {
        run(
            Command::new("chown").args(["-R", "postgres:"]).arg(&dir),
            "chown",
        );
    }
    let tool = |name: &str| {
        if as_root {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(bin.join(name));
            command
        } else {
            Command::new(bin.join(name))
        }
    };
    let data = dir.join("data");
    run(
        tool("initdb").arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]),
        "initdb",
    );
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("find a free port")
        .port();
    let options = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300",
        dir.display()
    );
    run(
        tool("pg_ctl")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.join("log"))
            .args(["-o", &options, "-w", "start"]),
        "pg_ctl start",
    );
    std::fs::write(&port_file, port.to_string()).expect("note the cluster's port");
    eprintln!(
        "started a throwaway Postgres for the tests on port {port} ({}); stop it with: pg_ctl -D {} stop",
        dir.display(),
        data.display()
    );
    port
}

/// The directory of the newest installed `initdb`.
fn server_binaries() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin"))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    versions.sort_by_key(|bin| {
        bin.parent()
            .and_then(Path::file_name)
            .and_then(|v| v.to_str()?.parse::<u32>().ok())
    });
    versions.pop().or_else(|| {
        let found = Command::new("sh")
            .args(["-c", "command -v initdb"])
            .output()
            .ok()?;
        let path = PathBuf::from(String::from_utf8(found.stdout).ok()?.trim());
        path.parent().map(Path::to_path_buf)
    })
}

fn run(command: &mut Command, what: &str) {
    let output = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
