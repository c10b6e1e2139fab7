//! The harness itself: real servers come up, answer, and go away on drop.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;

use jetsource_test_support::{NatsServer, RedisServer};

#[test]
fn redis_answers_and_is_gone_after_drop() {
    let redis = RedisServer::start();
    let port = redis.port();
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.write_all(b"PING\r\n").unwrap();
    let mut buf = [0u8; 7];
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"+PONG\r\n");
    assert!(redis.url().starts_with("redis://127.0.0.1:"));
    drop(conn);
    drop(redis);
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "redis-server was stopped"
    );
}

#[tokio::test]
async fn nats_has_jetstream_and_two_servers_do_not_share_anything() {
    let a = NatsServer::start();
    let b = NatsServer::start();
    assert_ne!(a.port(), b.port());
    let client = a.client().await;
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "S".into(),
        subjects: vec!["s.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let other = async_nats::jetstream::new(b.client().await);
    assert!(other.get_stream("S").await.is_err(), "b has its own store");
    let port = a.port();
    drop(a);
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nats-server was stopped"
    );
}

fn redis_ping(port: u16) -> std::io::Result<[u8; 7]> {
    let mut conn = TcpStream::connect(("127.0.0.1", port))?;
    conn.write_all(b"PING\r\n")?;
    let mut buf = [0u8; 7];
    conn.read_exact(&mut buf)?;
    Ok(buf)
}

#[test]
fn redis_killed_and_started_again_is_empty_on_the_same_port() {
    let mut redis = RedisServer::start();
    let port = redis.port();
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.write_all(b"SET k v\r\n").unwrap();
    let mut ok = [0u8; 5];
    conn.read_exact(&mut ok).unwrap();
    assert_eq!(&ok, b"+OK\r\n");
    redis.kill();
    assert!(redis_ping(port).is_err(), "down after kill");
    let mut buf = [0u8; 1];
    assert_eq!(conn.read(&mut buf).unwrap_or(0), 0, "open connections drop");
    redis.start_again();
    assert_eq!(redis.port(), port);
    assert_eq!(&redis_ping(port).unwrap(), b"+PONG\r\n");
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.write_all(b"EXISTS k\r\n").unwrap();
    let mut reply = [0u8; 4];
    conn.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b":0\r\n", "the data is gone");
    redis.restart_empty();
    assert_eq!(&redis_ping(port).unwrap(), b"+PONG\r\n");
}
