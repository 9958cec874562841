//! Walkthrough of the replication library: two in-memory pools in one process, the
//! secondary listening on loopback in plain TCP (`--insecure`: loopback tests only), the
//! primary shipping a snapshot every second while a writer changes the volume. Prints both
//! sides' status as `repl status --json` would, then checks that the secondary's latest
//! snapshot equals the primary's snapshot of the same id.
//!
//! `cargo run -p replicate --example loopback`

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use replicate::{Primary, PrimaryConfig, Secondary, SecondaryConfig, State};
use tables::io::{read_blocking, write_blocking};
use tables::mem::MemDevice;
use tables::{Bytes, WriteFlags};
use thin::{Pool, PoolOptions, ThinId};

const VOL: u64 = 16 << 20;

fn pool(name: &str) -> Result<Arc<Pool>, Box<dyn std::error::Error>> {
    let meta = Arc::new(MemDevice::new(format!("{name}-meta"), Bytes(4 << 20)));
    let data = Arc::new(MemDevice::new(format!("{name}-data"), Bytes(64 << 20)));
    let o = PoolOptions {
        data_block_sectors: 128,
        commit_interval: None,
        ..PoolOptions::default()
    };
    Ok(iort::block_on(Pool::open(meta, data, o))??)
}

fn read_all(pool: &Arc<Pool>, id: ThinId) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let dev = pool.thin(id, Bytes(VOL), None)?;
    let mut buf = vec![0u8; VOL as usize];
    read_blocking(&*dev, Bytes(0), &mut buf)?;
    Ok(buf)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let (primary_pool, secondary_pool) = (pool("site-a")?, pool("site-b")?);
    // The volume to replicate: thin id 1 on the primary.
    primary_pool.create_thin(ThinId(1))?;
    let vol = primary_pool.thin(ThinId(1), Bytes(VOL), None)?;

    // Secondary: copy in thin 7, complete snapshots alternate between 100 and 101.
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let secondary = Arc::new(Secondary::new(SecondaryConfig {
        volume: "3f0c5a52-demo".into(),
        pool: secondary_pool.clone(),
        copy: ThinId(7),
        size: Bytes(VOL),
        snap_ids: [ThinId(100), ThinId(101)],
        state_path: dir.path().join("secondary.json"),
        tls: None, // replicate::tls::server_config(dir) in production
    })?);
    let s = secondary.clone();
    let serving = std::thread::spawn(move || s.serve(listener));

    // Primary: a snapshot every second into thin 100/101 of its own pool.
    let primary = Arc::new(Primary::new(PrimaryConfig {
        volume: "3f0c5a52-demo".into(),
        pool: primary_pool.clone(),
        thin: ThinId(1),
        size: Bytes(VOL),
        snap_ids: [ThinId(100), ThinId(101)],
        interval: Duration::from_secs(1),
        state_path: dir.path().join("primary.json"),
        peer: addr.to_string(),
        server_name: "127.0.0.1".into(),
        tls: None, // replicate::tls::client_config(dir) in production
        bwlimit: None,
    }));
    let p = primary.clone();
    let sending = std::thread::spawn(move || p.run());

    for round in 0..4u8 {
        for b in 0..8u64 {
            let block = vec![round.wrapping_add(b as u8); 64 * 1024];
            let off = (u64::from(round) * 8 + b) * 64 * 1024;
            write_blocking(&*vol, Bytes(off), &block, WriteFlags::default())?;
        }
        std::thread::sleep(Duration::from_millis(1500));
        println!("primary:   {}", serde_json::to_string(&primary.status())?);
        println!("secondary: {}", serde_json::to_string(&secondary.status())?);
    }
    primary.stop();
    secondary.stop();
    sending.join().map_err(|_| "the primary thread panicked")?;
    serving
        .join()
        .map_err(|_| "the secondary thread panicked")??;

    let acked = State::load(&dir.path().join("primary.json"))?;
    let (snap, id) = secondary.latest()?.ok_or("nothing replicated")?;
    let same = read_all(&primary_pool, ThinId(acked.thin_id))? == read_all(&secondary_pool, id)?;
    println!(
        "secondary holds snapshot {snap} (primary acknowledged {}): identical = {same}",
        acked.snapshot
    );
    if !same || snap != acked.snapshot {
        return Err("the copies differ".into());
    }
    Ok(())
}
