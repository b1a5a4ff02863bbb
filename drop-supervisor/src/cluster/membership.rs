//! Membership and failure detection: one memberlist (SWIM + Lifeguard) instance per node, on TCP
//! (joins, push/pull, reliable messages) and UDP (probes, gossip), encrypted with the cluster key.
//!
//! This is the only module that knows memberlist's types. The rest of the cluster code sees a
//! [`Membership`] handle with plain Rust answers ([`Member`]) and supplies an [`Application`]:
//! the node's metadata, the user messages it broadcasts, and the full state exchanged by
//! push/pull anti-entropy. memberlist calls the application from its own tasks, so the
//! application's methods must be quick and must not block.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use memberlist::Options;
use memberlist::delegate::{CompositeDelegate, EventDelegate, NodeDelegate, VoidDelegate};
use memberlist::net::NetTransportOptions;
use memberlist::net::stream_layer::tcp::Tcp;
use memberlist::proto::{
    EncryptionAlgorithm, MaybeResolvedAddress, Meta, NodeState, SecretKey, State,
};
use memberlist::tokio::{TokioRuntime, TokioSocketAddrResolver, TokioTcpMemberlist};
use serde::{Deserialize, Serialize};
use smol_str::SmolStr;

/// The most metadata memberlist carries for one node.
pub const META_LIMIT: usize = 512;

/// What the node plugs into memberlist. Every method runs on memberlist's tasks: no blocking.
pub trait Application: Send + Sync + 'static {
    /// This node's metadata, at most [`META_LIMIT`] bytes (longer answers are replaced by
    /// nothing rather than crash memberlist).
    fn node_meta(&self) -> Vec<u8>;
    /// A user message from a peer: a gossip broadcast or a reliable (TCP) send.
    fn on_message(&self, msg: &[u8]);
    /// Messages to piggyback on this gossip round: `limit` bytes in all, each costing its
    /// length plus `overhead`.
    fn broadcasts(&self, num_nodes: usize, limit: usize, overhead: usize) -> Vec<Bytes>;
    /// The full state sent to a peer during push/pull.
    fn local_state(&self, join: bool) -> Vec<u8>;
    /// A peer's full state received during push/pull.
    fn merge_remote_state(&self, buf: &[u8], join: bool);
    /// A member joined, left or changed its metadata.
    fn on_membership_change(&self);
}

/// Timing knobs, with memberlist's names. Profiles are starting points; the config may override
/// any knob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timing {
    pub probe_interval: Duration,
    pub probe_timeout: Duration,
    pub suspicion_mult: usize,
    pub suspicion_max_timeout_mult: usize,
    pub gossip_interval: Duration,
    pub gossip_nodes: usize,
    pub gossip_to_the_dead_time: Duration,
    pub push_pull_interval: Duration,
    pub retransmit_mult: usize,
    pub indirect_checks: usize,
    /// Stream connections (join, push/pull) and, in memberlist 0.8.5, the TCP fallback of a
    /// failed probe too: a silent node is only declared suspect after this.
    pub timeout: Duration,
    /// Lifeguard: how far a node that misses acks slows its own probing (1 = never). High
    /// values keep a struggling node from accusing healthy ones, but also slow the minority
    /// side of a partition in noticing it lost the majority.
    pub awareness_max_multiplier: usize,
    /// No TCP fallback when a UDP probe fails. In memberlist 0.8.5 that fallback waits for the
    /// whole stream `timeout` instead of the probe's deadline, which delays declaring a silent
    /// node by that much; indirect probes through other members still guard against one bad
    /// path.
    pub disable_reliable_pings: bool,
}

impl Timing {
    /// The default: memberlist's LAN settings with a shorter suspicion (multiplier 3 instead of
    /// 4), more frequent push/pull (10 s instead of 30 s), a 2 s stream timeout (10 s), a
    /// Lifeguard slow-down of at most 3× (8×) and no TCP fallback probe, so that a crashed
    /// process or a silent host at N = 100 is declared in about 4 s (`cargo xtask bench
    /// cluster`) and anti-entropy repairs a missed update within seconds.
    pub fn lan() -> Timing {
        Timing {
            probe_interval: Duration::from_millis(500),
            probe_timeout: Duration::from_millis(400),
            suspicion_mult: 3,
            suspicion_max_timeout_mult: 4,
            gossip_interval: Duration::from_millis(200),
            gossip_nodes: 3,
            gossip_to_the_dead_time: Duration::from_secs(30),
            push_pull_interval: Duration::from_secs(10),
            retransmit_mult: 4,
            indirect_checks: 3,
            timeout: Duration::from_secs(2),
            awareness_max_multiplier: 3,
            disable_reliable_pings: true,
        }
    }

    /// For small namespaces that need quick failover (N ≤ 10): a crash is declared within about
    /// one second, at the price of more probe traffic and false suspicions on a loaded network.
    pub fn fast() -> Timing {
        Timing {
            probe_interval: Duration::from_millis(200),
            probe_timeout: Duration::from_millis(100),
            suspicion_mult: 2,
            suspicion_max_timeout_mult: 3,
            gossip_interval: Duration::from_millis(50),
            gossip_nodes: 4,
            gossip_to_the_dead_time: Duration::from_secs(10),
            push_pull_interval: Duration::from_secs(5),
            retransmit_mult: 4,
            indirect_checks: 2,
            timeout: Duration::from_secs(1),
            awareness_max_multiplier: 1,
            disable_reliable_pings: true,
        }
    }

    /// The named profile, if there is one.
    pub fn profile(name: &str) -> Option<Timing> {
        match name {
            "lan" => Some(Timing::lan()),
            "fast" => Some(Timing::fast()),
            _ => None,
        }
    }

    fn options(&self) -> Options {
        Options::lan()
            .with_probe_interval(self.probe_interval)
            .with_probe_timeout(self.probe_timeout)
            .with_suspicion_mult(self.suspicion_mult)
            .with_suspicion_max_timeout_mult(self.suspicion_max_timeout_mult)
            .with_gossip_interval(self.gossip_interval)
            .with_gossip_nodes(self.gossip_nodes)
            .with_gossip_to_the_dead_time(self.gossip_to_the_dead_time)
            .with_push_pull_interval(self.push_pull_interval)
            .with_retransmit_mult(self.retransmit_mult)
            .with_indirect_checks(self.indirect_checks)
            .with_timeout(self.timeout)
            .with_awareness_max_multiplier(self.awareness_max_multiplier)
            .with_disable_reliable_pings(self.disable_reliable_pings)
    }
}

/// How to start a member.
#[derive(Clone)]
pub struct MembershipOptions {
    /// The node's identity (its UUID, as text).
    pub id: String,
    /// TCP and UDP address to listen on.
    pub bind: SocketAddr,
    /// Address peers use to reach this node (default: `bind`).
    pub advertise: Option<SocketAddr>,
    /// The cluster key. `None` only in tests of the refusal itself.
    pub key: Option<SecretKey>,
    pub timing: Timing,
}

/// A member as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: String,
    pub addr: SocketAddr,
    pub state: MemberState,
    pub meta: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    Alive,
    Suspect,
    Dead,
    Left,
}

impl MemberState {
    /// Alive or suspected: still counted as a member until the suspicion is confirmed.
    pub fn is_up(self) -> bool {
        matches!(self, MemberState::Alive | MemberState::Suspect)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("cannot start cluster membership on {bind}: {message}")]
    Start { bind: SocketAddr, message: String },
    #[error("cluster membership: {0}")]
    Other(String),
}

/// Parses a cluster key: base64 of 16, 24 or 32 bytes (AES-128, -192 or -256).
pub fn parse_key(text: &str) -> Result<SecretKey, String> {
    SecretKey::try_from(text.trim())
        .map_err(|e| format!("not base64 of a 16, 24 or 32 byte key: {e}"))
}

/// A new random AES-256 cluster key, base64-encoded.
pub fn generate_key() -> String {
    SecretKey::random_aes256().to_base64()
}

struct Glue {
    app: Arc<dyn Application>,
}

impl NodeDelegate for Glue {
    async fn node_meta(&self, limit: usize) -> Meta {
        let meta = self.app.node_meta();
        if meta.len() > limit.min(META_LIMIT) {
            tracing::error!(
                len = meta.len(),
                limit,
                "node metadata too long; sending none"
            );
            return Meta::empty();
        }
        Meta::try_from(meta).unwrap_or_else(|_| Meta::empty())
    }

    async fn notify_message(&self, msg: Cow<'_, [u8]>) {
        self.app.on_message(&msg);
    }

    async fn broadcast_messages<F>(
        &self,
        limit: usize,
        encoded_len: F,
    ) -> impl Iterator<Item = Bytes> + Send
    where
        F: Fn(Bytes) -> (usize, Bytes) + Send + Sync + 'static,
    {
        let overhead = encoded_len(Bytes::new()).0;
        self.app.broadcasts(usize::MAX, limit, overhead).into_iter()
    }

    async fn local_state(&self, join: bool) -> Bytes {
        Bytes::from(self.app.local_state(join))
    }

    async fn merge_remote_state(&self, buf: &[u8], join: bool) {
        self.app.merge_remote_state(buf, join);
    }
}

impl EventDelegate for Glue {
    type Id = SmolStr;
    type Address = SocketAddr;

    async fn notify_join(&self, _node: Arc<NodeState<SmolStr, SocketAddr>>) {
        self.app.on_membership_change();
    }

    async fn notify_leave(&self, _node: Arc<NodeState<SmolStr, SocketAddr>>) {
        self.app.on_membership_change();
    }

    async fn notify_update(&self, _node: Arc<NodeState<SmolStr, SocketAddr>>) {
        self.app.on_membership_change();
    }
}

type Void = VoidDelegate<SmolStr, SocketAddr>;
type Delegate =
    CompositeDelegate<SmolStr, SocketAddr, Void, Void, Arc<Glue>, Void, Arc<Glue>, Void>;
type Ml = TokioTcpMemberlist<SmolStr, TokioSocketAddrResolver, Delegate>;

/// A running member of the cluster.
pub struct Membership {
    ml: Ml,
    timing: Timing,
}

impl Membership {
    /// Binds and starts gossiping (alone until [`Membership::join`]).
    pub async fn start(
        opts: MembershipOptions,
        app: Arc<dyn Application>,
    ) -> Result<Membership, MembershipError> {
        let glue = Arc::new(Glue { app });
        let delegate = CompositeDelegate::new()
            .with_node_delegate(glue.clone())
            .with_event_delegate(glue);
        let mut transport =
            NetTransportOptions::<SmolStr, TokioSocketAddrResolver, Tcp<TokioRuntime>>::new(
                SmolStr::new(&opts.id),
            );
        transport.add_bind_address(opts.bind);
        if let Some(adv) = opts.advertise {
            transport = transport.with_advertise_address(adv);
        }
        let mut options = opts.timing.options();
        if let Some(key) = opts.key {
            // Both directions verified: a node without the key can neither read nor be read.
            options = options
                .with_primary_key(key)
                .with_encryption_algo(EncryptionAlgorithm::NoPadding)
                .with_gossip_verify_incoming(true)
                .with_gossip_verify_outgoing(true);
        }
        let ml = Ml::with_delegate(delegate, transport, options)
            .await
            .map_err(|e| MembershipError::Start {
                bind: opts.bind,
                message: e.to_string(),
            })?;
        Ok(Membership {
            ml,
            timing: opts.timing,
        })
    }

    /// Contacts `seeds` (skipping this node's own address) and syncs state with them. Returns
    /// how many answered; the errors of the others are logged.
    /// Contacts one member and syncs state with it.
    pub async fn join_one(&self, addr: SocketAddr) -> Result<(), MembershipError> {
        self.ml
            .join(MaybeResolvedAddress::Resolved(addr))
            .await
            .map(|_| ())
            .map_err(|e| MembershipError::Other(e.to_string()))
    }

    pub async fn join(&self, seeds: &[SocketAddr]) -> usize {
        let me = *self.ml.advertise_address();
        let mut joined = 0;
        for seed in seeds.iter().filter(|s| **s != me) {
            match self.ml.join(MaybeResolvedAddress::Resolved(*seed)).await {
                Ok(_) => joined += 1,
                Err(e) => tracing::debug!(%seed, error = %e, "seed did not answer"),
            }
        }
        joined
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    pub fn id(&self) -> &str {
        self.ml.local_id()
    }

    pub fn advertise(&self) -> SocketAddr {
        *self.ml.advertise_address()
    }

    /// Every member memberlist knows, this node included, dead ones until they are reaped.
    ///
    /// memberlist 0.8.5 keeps the state it reports in `members()` as of the node's last alive
    /// message, so it never says dead; whether a node is up comes from `online_members()`.
    pub async fn members(&self) -> Vec<Member> {
        let online: std::collections::HashSet<SmolStr> = self
            .ml
            .online_members()
            .await
            .iter()
            .map(|n| n.id().clone())
            .collect();
        self.ml
            .members()
            .await
            .iter()
            .map(|n| Member {
                id: n.id().to_string(),
                addr: *n.address(),
                state: match (online.contains(n.id()), n.state()) {
                    (true, State::Suspect) => MemberState::Suspect,
                    (true, _) => MemberState::Alive,
                    (false, State::Left) => MemberState::Left,
                    (false, _) => MemberState::Dead,
                },
                meta: n.meta().to_vec(),
            })
            .collect()
    }

    /// One UDP ping, answered within `probe_timeout`: whether `id` at `addr` acked.
    pub async fn ping(&self, id: &str, addr: SocketAddr) -> bool {
        self.ml
            .ping(memberlist::proto::Node::new(SmolStr::new(id), addr))
            .await
            .is_ok()
    }

    /// Re-reads [`Application::node_meta`] and gossips it.
    pub async fn update_meta(&self) -> Result<(), MembershipError> {
        self.ml
            .update_node(Duration::from_secs(1))
            .await
            .map_err(|e| MembershipError::Other(e.to_string()))
    }

    /// Sends `msg` to one member over TCP; it arrives as [`Application::on_message`].
    pub async fn send_reliable(&self, to: SocketAddr, msg: Bytes) -> Result<(), MembershipError> {
        self.ml
            .send_reliable(&to, msg)
            .await
            .map_err(|e| MembershipError::Other(e.to_string()))
    }

    /// Says goodbye (peers see `left` at once instead of suspecting a crash), then stops.
    pub async fn leave_and_stop(&self, timeout: Duration) {
        if let Err(e) = self.ml.leave(timeout).await {
            tracing::debug!(error = %e, "leave");
        }
        self.stop().await;
    }

    /// Stops without saying goodbye: to peers this looks like a crash.
    pub async fn stop(&self) {
        if let Err(e) = self.ml.shutdown().await {
            tracing::debug!(error = %e, "membership shutdown");
        }
    }
}
