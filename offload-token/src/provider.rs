//! [`Provider`]: FSCTL_OFFLOAD_READ and FSCTL_OFFLOAD_WRITE (MS-FSCC 2.3.77-2.3.80) over
//! [`TrackedDisk`]s.
//!
//! - [`Provider::offload_read`] mints a token over `[offset, offset+len)` of a source and
//!   returns it with a transfer length that may be shorter than asked: at most
//!   [`Limits::max_token_len`], never past the end of the disk, and ending at the end of the
//!   allocated data when the rest of the asked range reads as zero, in which case the reply
//!   carries [`ALL_ZERO_BEYOND_CURRENT_RANGE`]. A range that starts with a long enough run of
//!   zeros (or is all zeros) gets the well-known zero-data token instead of a sealed one.
//! - [`Provider::offload_write`] redeems a token (from `token_offset` into its range) into a
//!   destination and may write less than asked (at most [`Limits::max_write_len`] per call);
//!   the caller loops, as [`Provider::copy`] does.

use std::sync::Arc;
use std::time::Duration;

use block_io::{BlockDevice, BlockStatus};
use parking_lot::RwLock;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::acl::{Access, AccessPolicy, Principal};
use crate::body::{Audience, TokenBody, TokenId};
use crate::clock::{Clock, SystemClock};
use crate::envelope::Token;
use crate::error::{Error, FormatError, Result};
use crate::key::{KeyRing, Opened, ProviderKey};
use crate::registry::{Entry, Registry};
use crate::tracked::{LiveState, TrackedDisk};

/// OFFLOAD_READ_FLAG_ALL_ZERO_BEYOND_CURRENT_RANGE (MS-FSCC 2.3.78): the asked range past
/// the transfer length reads as zeros.
pub const ALL_ZERO_BEYOND_CURRENT_RANGE: u32 = 0x0000_0001;

/// Most block-status calls one offload read makes while looking for the end of the data.
const MAX_STATUS_CALLS: usize = 4096;

/// Size and lifetime limits of a provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Longest range one sealed token covers (default 256 MiB, so a redeemer's reads stay
    /// short).
    pub max_token_len: u64,
    /// Most bytes one offload write copies (default 16 MiB: one call well under 4 s).
    pub max_write_len: u64,
    /// A leading run of zeros at least this long (or reaching the end of the asked range)
    /// is answered with the zero-data token (default 1 MiB).
    pub min_zero_run: u64,
    /// Inactivity TTL when the caller asks for none (default 30 s).
    pub default_ttl: Duration,
    /// Longest inactivity TTL granted (default 10 min).
    pub max_ttl: Duration,
    /// Time from issue to hard expiry (default 1 h; at least the granted TTL).
    pub lifetime: Duration,
    /// Most live tokens one principal may hold (default 64).
    pub max_live_per_principal: usize,
    /// Most live tokens in the provider (default 4096).
    pub max_live_total: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_token_len: 256 << 20,
            max_write_len: 16 << 20,
            min_zero_run: 1 << 20,
            default_ttl: Duration::from_secs(30),
            max_ttl: Duration::from_secs(600),
            lifetime: Duration::from_secs(3600),
            max_live_per_principal: 64,
            max_live_total: 4096,
        }
    }
}

/// An offload read with every option.
#[derive(Debug, Clone, Default)]
pub struct ReadRequest {
    /// Source offset (whole sectors).
    pub offset: u64,
    /// Length asked (whole sectors, > 0).
    pub len: u64,
    /// Inactivity TTL (`None` or zero: [`Limits::default_ttl`]; capped at
    /// [`Limits::max_ttl`]).
    pub ttl: Option<Duration>,
    /// Who may redeem (`None`: the caller alone).
    pub audience: Option<Audience>,
    /// Opaque binding to the source's state, for re-admission in another process.
    pub source_stamp: [u8; 32],
    /// Opaque locator of the source (at most 246 bytes).
    pub locator: Vec<u8>,
}

/// The reply to an offload read (FSCTL_OFFLOAD_READ_OUTPUT).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadOutput {
    /// The token: sealed, or the zero-data token.
    pub token: Token,
    /// Bytes from the asked offset the token represents (> 0, whole sectors).
    pub transfer_length: u64,
    /// [`ALL_ZERO_BEYOND_CURRENT_RANGE`] or 0.
    pub flags: u32,
}

impl ReadOutput {
    /// Whether the asked range past `transfer_length` reads as zeros.
    pub fn all_zero_beyond(&self) -> bool {
        self.flags & ALL_ZERO_BEYOND_CURRENT_RANGE != 0
    }
}

/// What [`Provider::copy`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Offload reads made.
    pub reads: u64,
    /// Offload writes made.
    pub writes: u64,
    /// Bytes written from sealed tokens.
    pub data_bytes: u64,
    /// Bytes written as zeros (zero-data token).
    pub zero_bytes: u64,
}

/// Where token ids come from.
#[derive(Debug)]
enum IdSource {
    Random,
    Seeded {
        seed: u64,
        next: std::sync::atomic::AtomicU64,
    },
}

/// An offload provider: mints tokens over its disks, redeems them into its disks.
#[derive(Debug)]
pub struct Provider {
    id: Uuid,
    keys: RwLock<KeyRing>,
    policy: Arc<dyn AccessPolicy>,
    clock: Arc<dyn Clock>,
    limits: Limits,
    registry: Registry,
    ids: IdSource,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn io(op: &'static str) -> impl FnOnce(block_io::Error) -> Error {
    move |e| Error::Io(op, e)
}

fn check_aligned(what: &'static str, value: u64, sector: u64) -> Result<()> {
    if value % sector != 0 {
        return Err(Error::Unaligned {
            what,
            value,
            sector,
        });
    }
    Ok(())
}

impl Provider {
    /// A provider named `id`, sealing with `keys`, deciding rights with `policy`, on the
    /// system clock with default [`Limits`].
    pub fn new(id: Uuid, keys: KeyRing, policy: Arc<dyn AccessPolicy>) -> Self {
        Provider {
            id,
            keys: RwLock::new(keys),
            policy,
            clock: Arc::new(SystemClock),
            limits: Limits::default(),
            registry: Registry::default(),
            ids: IdSource::Random,
        }
    }

    /// The same provider on another clock (tests use a [`ManualClock`](crate::ManualClock)).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The same provider with other limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The same provider with token ids derived from `seed` and a counter instead of random
    /// ones, for reproducible tests and fuzzing. Ids need to be unique, not secret (the seal
    /// is what cannot be forged), but two providers with the same seed and key would mint
    /// colliding ids.
    pub fn with_id_seed(mut self, seed: u64) -> Self {
        self.ids = IdSource::Seeded {
            seed,
            next: std::sync::atomic::AtomicU64::new(0),
        };
        self
    }

    /// The provider's id (recorded in every token it mints).
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Makes `key` the sealing key (old keys keep verifying); `false` if its id is taken.
    pub fn rotate_key(&self, key: ProviderKey) -> bool {
        self.keys.write().rotate(key)
    }

    /// Drops an old key: tokens sealed under it are refused from now on.
    pub fn retire_key(&self, id: u32) -> bool {
        self.keys.write().retire(id)
    }

    /// Parses and verifies a token with this provider's keys (no registry check).
    pub fn open(&self, token: &Token) -> std::result::Result<Opened, FormatError> {
        self.keys.read().open(token)
    }

    /// Revokes a token; returns whether it was live.
    pub fn revoke(&self, id: TokenId) -> bool {
        self.registry.revoke(id)
    }

    /// Revokes every live token minted by `who`; returns how many.
    pub fn revoke_minted_by(&self, who: &Principal) -> usize {
        let p = who.id();
        self.registry.revoke_where(|e| e.minter == p)
    }

    /// Revokes every live token over the disk `disk`; returns how many.
    pub fn revoke_disk(&self, disk: Uuid) -> usize {
        self.registry.revoke_where(|e| e.source.id() == disk)
    }

    /// Forgets dead tokens; returns the number of live ones.
    pub fn purge(&self) -> usize {
        self.registry.purge(self.clock.now_ms())
    }

    /// Live tokens minted by `who`.
    pub fn live_tokens_of(&self, who: &Principal) -> usize {
        self.registry.live_of(&who.id(), self.clock.now_ms())
    }

    /// Live tokens over the disk `disk`.
    pub fn live_tokens_on(&self, disk: Uuid) -> usize {
        self.registry.live_on(&disk)
    }

    /// The liveness flag of a live token (an error naming why it is not live).
    #[cfg(feature = "transfer")]
    pub(crate) fn live_state(&self, id: TokenId) -> Result<Arc<LiveState>> {
        Ok(self.registry.check(id, self.clock.now_ms())?.state)
    }

    /// Records that a live token was found invalidated.
    #[cfg(feature = "transfer")]
    pub(crate) fn mark_invalidated(&self, id: TokenId) {
        self.registry.invalidated(id);
    }

    /// Restarts a token's inactivity TTL (it was used).
    #[cfg(feature = "transfer")]
    pub(crate) fn touch(&self, id: TokenId) {
        self.registry.touch(id, self.clock.now_ms());
    }

    fn next_id(&self) -> TokenId {
        let mut id = [0u8; 16];
        match &self.ids {
            IdSource::Random => rand::RngCore::fill_bytes(&mut rand::rng(), &mut id),
            IdSource::Seeded { seed, next } => {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut h = Sha256::new();
                h.update(b"vdisk token id\0");
                h.update(seed.to_be_bytes());
                h.update(n.to_be_bytes());
                id.copy_from_slice(&h.finalize()[..16]);
            }
        }
        TokenId(id)
    }

    fn check_rights(&self, who: &Principal, access: Access, disk: Uuid) -> Result<()> {
        if self.policy.allows(&who.id(), access, &disk) {
            Ok(())
        } else {
            Err(Error::AccessDenied {
                principal: who.id(),
                op: access,
                disk,
            })
        }
    }

    /// FSCTL_OFFLOAD_READ: a token over `[offset, offset+len)` of `disk` that only `caller`
    /// may redeem, with inactivity TTL `ttl` (`None`: the default).
    pub fn offload_read(
        &self,
        caller: &Principal,
        disk: &Arc<TrackedDisk>,
        offset: u64,
        len: u64,
        ttl: Option<Duration>,
    ) -> Result<ReadOutput> {
        let req = ReadRequest {
            offset,
            len,
            ttl,
            ..ReadRequest::default()
        };
        self.offload_read_with(caller, disk, &req)
    }

    /// FSCTL_OFFLOAD_READ with every option (audience, source stamp, locator).
    pub fn offload_read_with(
        &self,
        caller: &Principal,
        disk: &Arc<TrackedDisk>,
        req: &ReadRequest,
    ) -> Result<ReadOutput> {
        let info = disk.info();
        let sector = u64::from(info.logical_sector_size.max(1));
        let (offset, len) = (req.offset, req.len);
        if len == 0 {
            return Err(Error::InvalidRequest("offload read of zero bytes"));
        }
        // MS-FSCC 2.3.77: FileOffset and CopyLength are logical-sector aligned.
        check_aligned("offset", offset, sector)?;
        check_aligned("length", len, sector)?;
        if offset >= info.virtual_size {
            return Err(Error::OutOfRange {
                what: "offset",
                offset,
                size: info.virtual_size,
                within: "disk",
            });
        }
        if req.locator.len() > crate::body::MAX_LOCATOR {
            return Err(Error::InvalidRequest("locator longer than 246 bytes"));
        }
        if self.limits.max_token_len < sector || self.limits.max_write_len < sector {
            return Err(Error::InvalidRequest("limits smaller than one sector"));
        }
        self.check_rights(caller, Access::Read, disk.id())?;
        // Never past the end of the disk: a token must not expose bytes beyond it.
        let end = offset.saturating_add(len.min(info.virtual_size - offset));
        let cap = self.limits.max_token_len - self.limits.max_token_len % sector;
        let plan = plan_read(
            disk.as_ref(),
            offset,
            end,
            cap,
            self.limits.min_zero_run,
            sector,
        )?;
        let (transfer_length, flags) = match plan {
            Plan::Zero { len } => {
                return Ok(ReadOutput {
                    token: Token::zero(),
                    transfer_length: len,
                    flags: 0,
                })
            }
            Plan::Data { len, rest_zero } => (
                len,
                if rest_zero && offset + len < end {
                    ALL_ZERO_BEYOND_CURRENT_RANGE
                } else {
                    0
                },
            ),
        };
        let now = self.clock.now_ms();
        let ttl = req
            .ttl
            .filter(|t| !t.is_zero())
            .unwrap_or(self.limits.default_ttl)
            .min(self.limits.max_ttl);
        let ttl_ms = u32::try_from(ms(ttl).max(1)).unwrap_or(u32::MAX);
        let lifetime = ms(self.limits.lifetime).max(u64::from(ttl_ms));
        let audience = req
            .audience
            .clone()
            .unwrap_or_else(|| Audience::single(caller.id()));
        let body = TokenBody {
            key_id: 0,
            id: self.next_id(),
            provider: self.id,
            disk: disk.id(),
            generation: disk.generation(),
            offset,
            length: transfer_length,
            sector_size: info.logical_sector_size,
            inactivity_ttl_ms: ttl_ms,
            issued_ms: now,
            expires_ms: now.saturating_add(lifetime),
            minter: caller.id(),
            audience: audience.clone(),
            source_stamp: req.source_stamp,
            locator: req.locator.clone(),
        };
        let token = self.keys.read().seal(&body)?;
        let entry = Entry {
            minter: caller.id(),
            audience,
            source: disk.clone(),
            offset,
            length: transfer_length,
            last_used_ms: now,
            ttl_ms: u64::from(ttl_ms),
            expires_ms: body.expires_ms,
            state: Arc::new(LiveState::default()),
        };
        self.registry.insert(
            body.id,
            entry,
            now,
            self.limits.max_live_per_principal,
            self.limits.max_live_total,
        )?;
        Ok(ReadOutput {
            token,
            transfer_length,
            flags,
        })
    }

    /// Re-admits a token minted by this provider's key in another process (the `vdisk
    /// token` verbs, where no registry outlives a command): verifies the seal, the provider
    /// id, the expiry (inactivity counted from the issue time, as no redeem could refresh
    /// it elsewhere), that `source` is the disk it names with the sector size and size it
    /// needs, and that `stamp` — the caller's fresh reading of the source's state — equals
    /// the token's source stamp. The token is then live here, over `source`, until it dies
    /// as any other. Returns its body.
    pub fn admit(
        &self,
        token: &Token,
        source: &Arc<TrackedDisk>,
        stamp: &[u8; 32],
    ) -> Result<TokenBody> {
        let body = match self.open(token)? {
            Opened::Zero => {
                return Err(Error::InvalidRequest(
                    "the zero-data token needs no admission",
                ))
            }
            Opened::Sealed(b) => b,
        };
        if body.provider != self.id {
            return Err(Error::ForeignProvider(body.provider));
        }
        let now = self.clock.now_ms();
        let inactive_at = body
            .issued_ms
            .saturating_add(u64::from(body.inactivity_ttl_ms));
        if now >= body.expires_ms || now >= inactive_at {
            return Err(Error::Expired(body.id));
        }
        let info = source.info();
        if source.id() != body.disk
            || info.logical_sector_size != body.sector_size
            || body.end() > info.virtual_size
            || body.source_stamp != *stamp
        {
            return Err(Error::SourceChanged);
        }
        let entry = Entry {
            minter: body.minter,
            audience: body.audience.clone(),
            source: source.clone(),
            offset: body.offset,
            length: body.length,
            last_used_ms: body.issued_ms,
            ttl_ms: u64::from(body.inactivity_ttl_ms),
            expires_ms: body.expires_ms,
            state: Arc::new(LiveState::default()),
        };
        self.registry.insert(
            body.id,
            entry,
            now,
            self.limits.max_live_per_principal,
            self.limits.max_live_total,
        )?;
        Ok(body)
    }

    /// FSCTL_OFFLOAD_WRITE: writes the token's data from `token_offset` into
    /// `[offset, offset+len)` of `dst`; returns the bytes written, which may be fewer than
    /// `len` (the token's range ends, or [`Limits::max_write_len`]), never more. A `len` of
    /// zero writes nothing.
    pub fn offload_write(
        &self,
        caller: &Principal,
        dst: &TrackedDisk,
        offset: u64,
        len: u64,
        token: &Token,
        token_offset: u64,
    ) -> Result<u64> {
        let info = dst.info();
        let dsector = u64::from(info.logical_sector_size.max(1));
        // MS-FSCC 2.3.79: FileOffset and CopyLength are logical-sector aligned.
        check_aligned("offset", offset, dsector)?;
        check_aligned("length", len, dsector)?;
        let end = offset
            .checked_add(len)
            .ok_or(Error::InvalidRequest("offset + length overflows"))?;
        if end > info.virtual_size || (len > 0 && offset >= info.virtual_size) {
            return Err(Error::OutOfRange {
                what: "range end",
                offset: end,
                size: info.virtual_size,
                within: "disk",
            });
        }
        let opened = self.open(token)?;
        if len == 0 {
            return Ok(0);
        }
        self.check_rights(caller, Access::Write, dst.id())?;
        let cap = self.limits.max_write_len - self.limits.max_write_len % dsector;
        let body = match opened {
            Opened::Zero => {
                let n = len.min(cap.max(dsector));
                // The zero-data token: the range reads as zeros afterwards; the device may
                // release the space.
                dst.write_zeroes(offset, n, true)
                    .map_err(io("writing zeros"))?;
                return Ok(n);
            }
            Opened::Sealed(b) => b,
        };
        if body.provider != self.id {
            return Err(Error::ForeignProvider(body.provider));
        }
        let now = self.clock.now_ms();
        let entry = self.registry.check(body.id, now)?;
        if !entry.audience.admits(&caller.id()) {
            return Err(Error::AudienceRefused(caller.id()));
        }
        // The token delegates its minter's right to read; it ends when that right does.
        if !self
            .policy
            .allows(&entry.minter, Access::Read, &entry.source.id())
        {
            return Err(Error::AccessDenied {
                principal: entry.minter,
                op: Access::Read,
                disk: entry.source.id(),
            });
        }
        let ssector = u64::from(body.sector_size);
        check_aligned("token offset", token_offset, ssector)?;
        if token_offset >= entry.length {
            return Err(Error::OutOfRange {
                what: "token offset",
                offset: token_offset,
                size: entry.length,
                within: "token range",
            });
        }
        let unit = dsector.max(ssector);
        let want = len.min(entry.length - token_offset).min(cap.max(unit));
        let n = want - want % unit;
        if n == 0 {
            return Err(Error::Unaligned {
                what: "remaining token length",
                value: want,
                sector: unit,
            });
        }
        let mut buf = vec![
            0u8;
            usize::try_from(n)
                .map_err(|_| Error::InvalidRequest("write too large for memory"))?
        ];
        entry
            .source
            .read_at(&mut buf, entry.offset + token_offset)
            .map_err(io("reading the token's source"))?;
        // A write overlapping the source invalidates the token before changing the data, so
        // a flag still clear now means the bytes read are the token's.
        if entry.state.is_invalidated() {
            self.registry.invalidated(body.id);
            return Err(Error::Invalidated(body.id));
        }
        dst.write_at(&buf, offset)
            .map_err(io("writing the destination"))?;
        self.registry.touch(body.id, now);
        Ok(n)
    }

    /// Copies `len` bytes from `src` at `src_offset` to `dst` at `dst_offset` by offload
    /// reads and writes, looping over short reads and short writes and writing the zero
    /// tail of an ALL_ZERO_BEYOND_CURRENT_RANGE reply with the zero-data token.
    pub fn copy(
        &self,
        caller: &Principal,
        src: &Arc<TrackedDisk>,
        src_offset: u64,
        dst: &TrackedDisk,
        dst_offset: u64,
        len: u64,
    ) -> Result<CopyStats> {
        let mut st = CopyStats::default();
        let mut done = 0;
        while done < len {
            let r = self.offload_read(caller, src, src_offset + done, len - done, None)?;
            st.reads += 1;
            let zero = r.token.is_zero();
            let mut t = 0;
            while t < r.transfer_length {
                let n = self.offload_write(
                    caller,
                    dst,
                    dst_offset + done + t,
                    r.transfer_length - t,
                    &r.token,
                    t,
                )?;
                if n == 0 {
                    return Err(Error::InvalidRequest("offload write made no progress"));
                }
                st.writes += 1;
                t += n;
            }
            if zero {
                st.zero_bytes += t;
            } else {
                st.data_bytes += t;
            }
            done += r.transfer_length;
            if r.all_zero_beyond() {
                let z = Token::zero();
                while done < len {
                    let n =
                        self.offload_write(caller, dst, dst_offset + done, len - done, &z, 0)?;
                    if n == 0 {
                        return Err(Error::InvalidRequest("offload write made no progress"));
                    }
                    st.writes += 1;
                    st.zero_bytes += n;
                    done += n;
                }
            }
        }
        Ok(st)
    }
}

/// What an offload read will answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// The zero-data token for `len` bytes.
    Zero { len: u64 },
    /// A sealed token for `len` bytes; `rest_zero`: the asked range past it reads as zeros.
    Data { len: u64, rest_zero: bool },
}

/// Walks `block_status` over `[offset, end)` (at most [`MAX_STATUS_CALLS`] runs) to find
/// where the data starts and ends. `Zero` and `Unallocated` runs read as zeros on a whole
/// disk (a chain resolves its parents itself).
fn plan_read(
    disk: &dyn BlockDevice,
    offset: u64,
    end: u64,
    cap: u64,
    min_zero_run: u64,
    sector: u64,
) -> Result<Plan> {
    let window_end = end.min(offset.saturating_add(cap));
    let mut pos = offset;
    let mut first_data: Option<u64> = None;
    let mut last_data_end = offset;
    let mut data_past_window = false;
    let mut calls = 0;
    while pos < end && calls < MAX_STATUS_CALLS {
        calls += 1;
        let run = disk
            .block_status(pos, end - pos)
            .map_err(io("querying block status"))?;
        // A device reporting a partial, empty or oversized run is clamped to whole sectors,
        // at least one, at most the rest.
        let n = (run.len - run.len % sector).max(sector).min(end - pos);
        if run.status == BlockStatus::Data {
            first_data.get_or_insert(pos);
            if pos < window_end {
                last_data_end = (pos + n).min(window_end);
            }
            if pos + n > window_end {
                data_past_window = true;
                break;
            }
        }
        pos += n;
    }
    let scanned_all = pos >= end || data_past_window;
    let zero_end = match first_data {
        Some(d) => d,
        None => pos,
    };
    let zero_len = zero_end - offset;
    let leading_zero_token =
        zero_len > 0 && (zero_len >= min_zero_run || (first_data.is_none() && scanned_all));
    if leading_zero_token {
        return Ok(Plan::Zero { len: zero_len });
    }
    match first_data {
        Some(_) if !data_past_window && scanned_all && last_data_end > offset => Ok(Plan::Data {
            len: last_data_end - offset,
            rest_zero: true,
        }),
        _ => Ok(Plan::Data {
            len: window_end - offset,
            rest_zero: false,
        }),
    }
}
