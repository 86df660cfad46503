//! The testkit's TCP proxy as a process, for the bench: forwards 127.0.0.1:<port> to
//! `upstream`, delaying every broker-to-client chunk (acknowledgements, confirms) by
//! `delay_ms`, as a broker in another zone would. Prints the port it listens on, then runs
//! until killed.
//!   delay_proxy 127.0.0.1:5672 5
#![allow(clippy::expect_used)] // a bench helper: bad arguments should stop it loudly

use flexbridge_testkit::TcpProxy;
use std::net::SocketAddr;
use std::time::Duration;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let upstream: SocketAddr = args
        .next()
        .expect("usage: delay_proxy <upstream host:port> <delay ms>")
        .parse()
        .expect("upstream must be an IP address and port");
    let delay: u64 = args
        .next()
        .map_or(Ok(0), |d| d.parse())
        .expect("the delay is a number of milliseconds");
    let proxy = TcpProxy::start(upstream).await;
    proxy.delay_responses(Duration::from_millis(delay));
    println!("{}", proxy.addr.port());
    std::future::pending::<()>().await;
}
