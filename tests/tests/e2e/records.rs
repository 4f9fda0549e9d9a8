//! The per-group records on the broker under several readers at once. Readers take a
//! halt record with `basic.get` and put it back (`basic.nack` with requeue), so while one
//! reader holds it, another one's `basic.get` finds the queue empty. A reader that meets
//! that empty answer asks again after short pauses, so `erel config retry` run while
//! another reader holds the halt still finds it and says which revision it ends.
//!
//! The other reader here is a raw AMQP channel of the test. It holds the record
//! unacknowledged until the command's first `basic.get` is on its way to the broker (the
//! command reaches the broker through a [`SlowLink`] without delay, whose tap sees it),
//! then [`HOLD`] longer, and puts it back: the command's first read finds the queue empty
//! every time, and only asking again finds the record.

use std::net::{SocketAddr, ToSocketAddrs};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use erel_master::amqp::control::HaltRecord;
use erel_master::rollout::halt::Halt;
use lapin::options::{BasicGetOptions, BasicNackOptions, BasicPublishOptions};
use lapin::options::{ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use crate::helper::amqp::{amqp_url, BrokerLock, TestBroker};
use crate::helper::slow_link::{Delay, SlowLink};
use crate::helper::{output_text, poll_until, Pki};

/// How long the test's reader still holds the halt record once the command's first
/// `basic.get` is on its way: well past that read, and within the pauses after which the
/// command asks again (300 ms in all).
const HOLD: Duration = Duration::from_millis(100);
/// Bound on the command's reaching its first read: process start, connection, declare.
const FIRST_READ: Duration = Duration::from_secs(20);

/// The revision the halt record names.
const HALTED_AT: u64 = 7;

/// Counts the `basic.get` methods in the byte stream a client sends to an AMQP 0-9-1
/// broker (AMQP 0-9-1 specification, sections 4.2.2-4.2.3: after the 8-byte protocol
/// header, frames of type (1 byte), channel (2), payload size (4, big-endian), payload,
/// and the end octet 0xCE; a method frame (type 1) begins its payload with the class id
/// and method id, 60 and 70 for `basic.get`).
#[derive(Default)]
struct BasicGets {
    pending: Vec<u8>,
    header_seen: bool,
    count: usize,
    /// When the first one was seen.
    first_at: Option<Instant>,
}

impl BasicGets {
    fn feed(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
        if !self.header_seen {
            if self.pending.len() < 8 {
                return;
            }
            self.pending.drain(..8);
            self.header_seen = true;
        }
        while self.pending.len() >= 7 {
            let size = u32::from_be_bytes(self.pending[3..7].try_into().expect("4 bytes"));
            let end = 7 + size as usize + 1;
            if self.pending.len() < end {
                return;
            }
            let payload = &self.pending[7..end - 1];
            if self.pending[0] == 1 && payload.starts_with(&[0, 60, 0, 70]) {
                self.count += 1;
                self.first_at.get_or_insert_with(Instant::now);
            }
            self.pending.drain(..end);
        }
    }
}

/// The first node of the broker URL list `url` (as `--amqp` takes it): its URL, the
/// `host:port` written in it, and that address resolved.
fn first_node(url: &str) -> (String, String, SocketAddr) {
    let first = url.split(',').next().expect("a URL").to_string();
    let uri: lapin::uri::AMQPUri = first.parse().expect("an AMQP URL");
    let authority = format!("{}:{}", uri.authority.host, uri.authority.port);
    assert!(
        first.contains(&authority),
        "the URL names its port: {first}"
    );
    let addr = authority
        .to_socket_addrs()
        .expect("resolve the broker")
        .next()
        .expect("an address");
    (first, authority, addr)
}

/// Declares `queue` as the master declares a halt queue (a durable quorum queue keeping
/// one message): the same arguments, or the broker refuses the master's declare.
async fn declare_halt_queue(channel: &Channel, queue: &str) {
    let mut args = FieldTable::default();
    args.insert(ShortString::from("x-max-length"), AMQPValue::LongLongInt(1));
    args.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .expect("declare the halt queue");
}

/// Publishes `record` to `queue`, persistent, and waits for the broker's confirm.
async fn publish_record(channel: &Channel, queue: &str, record: &HaltRecord) {
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    let body = serde_json::to_vec(record).expect("encode the record");
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into()),
        )
        .await
        .expect("publish the record")
        .await
        .expect("the broker's confirm");
    assert!(confirm.is_ack(), "the broker took the record: {confirm:?}");
}

#[test]
fn amqp_config_retry_finds_a_halt_that_another_reader_holds_for_a_moment() {
    let _lock = BrokerLock::shared();
    let broker = TestBroker::new("heldhalt", &["web"]);
    let queue = broker.broker.names().halt("web").expect("queue name");
    let pki = Pki::new();
    let halt = Halt {
        group: "web".to_string(),
        revision: HALTED_AT,
        release: "beat".to_string(),
        version: "2.5.0".to_string(),
        host: "held-1".to_string(),
        reason: "exited with code 3, rolled back".to_string(),
        since_ms: erel_master::amqp::now_ms(),
    };
    let gets = Arc::new(Mutex::new(BasicGets::default()));
    let tap = gets.clone();
    let link = SlowLink::new(Delay::fixed(Duration::ZERO))
        .tapping_upstream(move |bytes| tap.lock().expect("gets").feed(bytes));
    let (url, authority, broker_addr) = first_node(&amqp_url());
    let tapped = link.route("127.0.0.1:0".parse().expect("addr"), broker_addr);
    let proxied = url.replacen(&authority, &tapped.to_string(), 1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (out, held_for) = runtime.block_on(async {
        let connection = Connection::connect(&url, ConnectionProperties::default())
            .await
            .expect("connect to the broker");
        let channel = connection.create_channel().await.expect("a channel");
        declare_halt_queue(&channel, &queue).await;
        publish_record(&channel, &queue, &HaltRecord::Halted(halt.clone())).await;

        // Another reader takes the record and holds it, unacknowledged.
        let held = channel
            .basic_get(queue.as_str().into(), BasicGetOptions::default())
            .await
            .expect("basic.get")
            .expect("the halt record is there");
        // Meanwhile the queue answers empty to everyone else.
        let other = connection.create_channel().await.expect("a channel");
        let meanwhile = other
            .basic_get(queue.as_str().into(), BasicGetOptions::default())
            .await
            .expect("basic.get");
        assert!(meanwhile.is_none(), "a held record is not delivered twice");

        // `erel config retry` reaches the broker through a tap that sees its reads.
        let retry = tokio::process::Command::from(pki.erel())
            .args(["config", "retry", "--group", "web"])
            .args(["--amqp", &proxied, "--amqp-prefix", &broker.prefix])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start erel config retry");
        let first_read = poll_until(FIRST_READ, || async { gets.lock().expect("gets").first_at })
            .await
            .expect("erel config retry never read the record");
        tokio::time::sleep_until((first_read + HOLD).into()).await;
        held.delivery
            .nack(BasicNackOptions {
                multiple: false,
                requeue: true,
            })
            .await
            .expect("put the record back");
        let held_for = first_read.elapsed();
        let out = retry
            .wait_with_output()
            .await
            .expect("run erel config retry");
        let _ = connection.close(200, "done".into()).await;
        (out, held_for)
    });
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("tries revision {HALTED_AT} again")),
        "the retry did not find the halt held for {held_for:?} past its first read:\n{text}"
    );
    let gets = gets.lock().expect("gets").count;
    assert!(
        gets >= 2,
        "it read again after the empty answer: {gets} basic.get"
    );
}
