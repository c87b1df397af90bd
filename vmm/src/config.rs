//! TOML model of an amsvm configuration: small `*Config` structs, validated in one place
//! with errors that name the file, the partition and the field.
//!
//! ```toml
//! log_dir = "amsvm-logs"          # per-partition console logs (relative to this file)
//!
//! [[partition]]
//! name = "alpha"
//! logical_mib = 128               # the partition's RAM
//! vcpus = 1
//! image = "workload"              # the built-in workload guest, or a path to a native ELF
//! [partition.workload]
//! working_set_mib = 64
//! pattern = "hotspot"             # sequential | uniform | zipf | hotspot
//! write_pct = 30
//! passes = 4
//!
//! [[partition]]
//! name = "linux"
//! logical_mib = 256
//! kernel = "vmlinuz"              # Linux: bzImage or ELF vmlinux
//! initrd = "initrd.gz"
//! cmdline = "console=ttyS0"
//! [[partition.disk]]
//! path = "disk.img"
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use amsvm_abi::{layout, pattern, WorkloadParams};
use serde::Deserialize;

/// A configuration error. The message is one line and names the file and field.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// The most vCPUs a partition may have (one local APIC id per vCPU in the MADT, 8-bit ids).
pub const MAX_VCPUS: u32 = 64;
/// Most partitions one amsvm process hosts.
pub const MAX_PARTITIONS: usize = 64;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Directory for per-partition console logs.
    #[serde(default)]
    pub log_dir: Option<PathBuf>,
    /// Back guest memory with transparent huge pages where the host has them (default
    /// true): a guest access backed by a 2 MiB page costs KVM less. Memory a guest never
    /// touched still costs nothing, counted in 2 MiB ranges. In a pool: whole first
    /// touches and wholly resident ranges become huge pages, paging stays page by page.
    #[serde(default = "yes")]
    pub huge_pages: bool,
    /// The shared memory pool. Without it every partition has private RAM.
    #[serde(default)]
    pub pool: Option<PoolConfig>,
    /// Where hypervisor paging goes (with a pool).
    #[serde(default)]
    pub paging: Option<PagingConfig>,
    #[serde(default, rename = "partition")]
    pub partitions: Vec<PartitionConfig>,
}

/// `[pool]`: one memory budget for all partitions.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// The budget: resident partition pages never exceed it.
    pub size_mib: u64,
    /// Where the in-process paging store keeps one file per partition (default:
    /// `paging` next to the config).
    #[serde(default)]
    pub paging_dir: Option<PathBuf>,
    /// Whom the pool pages when it is full: "share" (the default) or "protect".
    #[serde(default)]
    pub policy: ReclaimPolicy,
    /// With `policy = "protect"`: seconds between rotations of the protection order
    /// (default [`DEFAULT_ROTATE_S`]).
    #[serde(default)]
    pub rotate_s: Option<u64>,
}

fn yes() -> bool {
    true
}

/// `[pool] policy`: whom the pool pages when it is full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReclaimPolicy {
    /// Every partition keeps its weighted share of the pool at every moment: when their
    /// working sets do not all fit, all of them page.
    #[default]
    Share,
    /// Working-set protection (load control): partitions are ranked by weight, equal
    /// weights in an order that rotates every `rotate_s`; a fault takes frames from the
    /// lowest-ranked partition first, so as many working sets as fit stay whole. A
    /// partition that has to page itself to run (it is at the bottom) yields its vCPUs'
    /// CPU time to the others until it is protected again.
    Protect,
}

/// Default `[pool] rotate_s`.
pub const DEFAULT_ROTATE_S: u64 = 10;

/// `[paging]`: the paging backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PagingConfig {
    /// "local": an in-process store, one file per partition (the default); "vm": the
    /// paging-server VM, one virtio-blk paging device per partition (`docs/vasi.md`).
    #[serde(default)]
    pub backend: PagingBackend,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PagingBackend {
    #[default]
    Local,
    Vm,
}

/// A validated pool.
#[derive(Debug, Clone)]
pub struct PoolSpec {
    pub size_bytes: u64,
    pub paging_dir: PathBuf,
    pub backend: PagingBackend,
    /// Measurement only (`amsvm bench pool`): serve faults with the bare userfaultfd
    /// round trip, no budget. Never set from a config file.
    pub raw_uffd: bool,
    pub policy: ReclaimPolicy,
    /// How long each protection order lasts (`policy = "protect"`).
    pub rotate: std::time::Duration,
    /// `huge_pages`: collapse wholly resident 2 MiB ranges into huge pages (and no KVM
    /// dirty logging, which would keep KVM's mappings at 4 KiB).
    pub huge_pages: bool,
}

/// Pool memory each partition needs beyond its `min_mib` to make progress (its vCPU's
/// code, stack, page tables and data must be resident at the same time).
pub const POOL_WORKING_MIN_MIB: u64 = 1;

/// Default `weight`: the middle of 0..=255.
pub const DEFAULT_WEIGHT: u8 = 128;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionConfig {
    pub name: String,
    pub logical_mib: u64,
    /// With a pool: never reclaimed below this many MiB.
    #[serde(default)]
    pub min_mib: u64,
    /// With a pool: 0–255, a higher weight keeps memory longer under pressure.
    #[serde(default = "default_weight")]
    pub weight: u8,
    /// With a pool: this partition's paging device (default: `<paging_dir>/<name>.pages`).
    #[serde(default)]
    pub paging_file: Option<PathBuf>,
    /// With a pool: how far the pool may ask this partition to loan memory through its
    /// virtio-balloon device: "off", "default" or "aggressive".
    #[serde(default)]
    pub loan_policy: LoanPolicy,
    #[serde(default = "one")]
    pub vcpus: u32,
    /// Native image: "workload" (built in) or a path to an ELF64 image.
    #[serde(default)]
    pub image: Option<String>,
    /// Linux kernel (bzImage or ELF vmlinux).
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: Option<String>,
    #[serde(default)]
    pub workload: Option<WorkloadConfig>,
    #[serde(default, rename = "disk")]
    pub disks: Vec<DiskConfig>,
    /// Copy the console to stdout, each line prefixed with the partition's name.
    #[serde(default)]
    pub console_stdout: bool,
}

fn one() -> u32 {
    1
}

/// How far the pool may ask a partition to loan memory (the AIX `ams_loan_policy` idea).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LoanPolicy {
    /// Never asked: the pool reclaims from it by hypervisor paging only.
    Off,
    /// Asked for the free memory its balloon statistics show, above its `min_mib`.
    #[default]
    Default,
    /// Asked for everything above its `min_mib`; the guest gives what it can.
    Aggressive,
}

impl std::str::FromStr for LoanPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(LoanPolicy::Off),
            "default" => Ok(LoanPolicy::Default),
            "aggressive" => Ok(LoanPolicy::Aggressive),
            _ => Err(format!("unknown loan policy {s:?} (off, default, aggressive)")),
        }
    }
}

impl LoanPolicy {
    /// The next policy in the order off, default, aggressive (and round again).
    pub fn next(self) -> LoanPolicy {
        match self {
            LoanPolicy::Off => LoanPolicy::Default,
            LoanPolicy::Default => LoanPolicy::Aggressive,
            LoanPolicy::Aggressive => LoanPolicy::Off,
        }
    }
}

impl std::fmt::Display for LoanPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LoanPolicy::Off => "off",
            LoanPolicy::Default => "default",
            LoanPolicy::Aggressive => "aggressive",
        })
    }
}

fn default_weight() -> u8 {
    DEFAULT_WEIGHT
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// Create the file with this size if it does not exist.
    #[serde(default)]
    pub create_mib: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadConfig {
    pub working_set_mib: u64,
    #[serde(default = "default_pattern")]
    pub pattern: String,
    #[serde(default = "default_write_pct")]
    pub write_pct: u32,
    #[serde(default)]
    pub passes: u64,
    #[serde(default)]
    pub duration_ms: u64,
    #[serde(default = "one64")]
    pub seed: u64,
    #[serde(default = "default_theta")]
    pub zipf_theta: f64,
    #[serde(default = "default_hot_pct")]
    pub hot_pct: u32,
    #[serde(default = "default_hot_access_pct")]
    pub hot_access_pct: u32,
    #[serde(default)]
    pub phase_accesses: u64,
    #[serde(default)]
    pub report_every: u64,
    #[serde(default)]
    pub disk_test_blocks: u64,
    /// Hostile requests before the normal workload (`WorkloadParams::chaos`).
    #[serde(default)]
    pub chaos: bool,
    /// Idle memory after the working set: stamped once at start, then left alone
    /// (`WorkloadParams::idle_pages`).
    #[serde(default)]
    pub idle_mib: u64,
    /// What the workload does with its balloon device: "ignore", "cooperate" or
    /// "report" (cooperate and report free pages).
    #[serde(default = "default_balloon")]
    pub balloon: String,
    /// Busy turns (`WorkloadParams::turn_ms`): of every `turns` turns of `turn_ms`, the
    /// workload is busy in turn `turn` and touches only its first `quiet_pct`% pages in
    /// the others. `turns` 0 or 1: always busy.
    #[serde(default)]
    pub turn_ms: u64,
    #[serde(default)]
    pub turns: u32,
    #[serde(default)]
    pub turn: u32,
    #[serde(default = "default_quiet_pct")]
    pub quiet_pct: u32,
    /// Fault campaign: the balloon driver goes silent after this many ms (0 = never;
    /// `WorkloadParams::balloon_silent_ms`).
    #[serde(default)]
    pub balloon_silent_ms: u32,
    /// Time every access from this one on (counted from 0) in the latency histogram
    /// (`WorkloadParams::latency_from`); absent: never.
    #[serde(default)]
    pub latency_from: Option<u64>,
}

fn default_quiet_pct() -> u32 {
    10
}

fn default_balloon() -> String {
    "cooperate".into()
}

fn default_pattern() -> String {
    "sequential".into()
}
fn default_write_pct() -> u32 {
    50
}
fn one64() -> u64 {
    1
}
fn default_theta() -> f64 {
    0.99
}
fn default_hot_pct() -> u32 {
    10
}
fn default_hot_access_pct() -> u32 {
    90
}

/// A validated configuration: partitions and, optionally, the pool they share.
#[derive(Debug, Clone)]
pub struct Setup {
    pub specs: Vec<PartitionSpec>,
    pub pool: Option<PoolSpec>,
}

/// What a partition boots.
#[derive(Debug, Clone)]
pub enum BootConfig {
    /// A native CPL3 image: the built-in workload (`None`) or an ELF file.
    Native { image: Option<PathBuf>, workload: WorkloadParams },
    Linux { kernel: PathBuf, initrd: Option<PathBuf>, cmdline: String },
}

/// What a partition is for.
#[derive(Debug, Clone, Default)]
pub enum PartitionRole {
    /// A guest of the user's.
    #[default]
    Guest,
    /// The paging-server VM: its devices are the VASI device of this channel and its
    /// `disks` (the paging devices), all handled on its vCPU's exits.
    PagingServer(std::sync::Arc<crate::devices::virtio::vasi::Channel>),
}

/// A validated partition, with paths resolved.
#[derive(Debug, Clone)]
pub struct PartitionSpec {
    pub role: PartitionRole,
    pub id: u32,
    pub name: String,
    pub mem_bytes: u64,
    /// Pool floor (bytes), weight and paging device; used only with a pool.
    pub min_bytes: u64,
    pub weight: u8,
    pub paging_file: Option<PathBuf>,
    pub loan_policy: LoanPolicy,
    pub vcpus: u32,
    pub boot: BootConfig,
    pub disks: Vec<DiskConfig>,
    pub console_stdout: bool,
    pub log_path: Option<PathBuf>,
    /// `huge_pages`: ask the host for transparent huge pages for this partition's RAM
    /// (`MADV_HUGEPAGE`; otherwise `MADV_NOHUGEPAGE`, 4 KiB pages only).
    pub huge_pages: bool,
}

/// Host RAM in bytes (MemTotal), the upper bound for any one partition.
pub fn host_mem_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        })
        .map(|kib| kib * 1024)
        .unwrap_or(u64::MAX)
}

/// Check a partition memory size: not zero, not above the host, not above `max`.
pub fn check_mem_mib(what: &str, mib: u64, max_bytes: u64) -> Result<u64, ConfigError> {
    if mib == 0 {
        return err(format!("{what}: memory size is 0 MiB; give at least 4"));
    }
    let bytes = mib.checked_mul(1 << 20).ok_or_else(|| ConfigError(format!("{what}: {mib} MiB is too large")))?;
    let host = host_mem_bytes();
    if bytes > host {
        return err(format!("{what}: {mib} MiB is larger than this host's memory ({} MiB)", host >> 20));
    }
    if bytes > max_bytes {
        return err(format!("{what}: {mib} MiB is above the supported maximum of {} MiB", max_bytes >> 20));
    }
    if mib < 4 {
        return err(format!("{what}: {mib} MiB is too small; give at least 4"));
    }
    Ok(bytes)
}

/// Turn a TOML parse error into one line: `file:line: message`.
fn toml_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let line = e.span().map(|s| text.as_bytes()[..s.start.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1);
    let msg = e.message().replace('\n', " ");
    match line {
        Some(l) => ConfigError(format!("{}:{l}: {msg}", path.display())),
        None => ConfigError(format!("{}: {msg}", path.display())),
    }
}

impl Config {
    /// The validated pool, if the config has one (`base`: the config's directory).
    pub fn pool_spec(&self, origin: &str, base: &Path, specs: &[PartitionSpec]) -> Result<Option<PoolSpec>, ConfigError> {
        let Some(pool) = &self.pool else {
            if self.paging.is_some() {
                return err(format!("{origin}: [paging] only applies with a [pool]"));
            }
            return Ok(None);
        };
        let what = format!("{origin}: [pool] size_mib");
        let size_bytes = check_mem_mib(&what, pool.size_mib, u64::MAX)?;
        let sum_min: u64 = specs.iter().map(|s| s.min_bytes).sum();
        if sum_min > size_bytes {
            return err(format!(
                "{origin}: the partitions' min_mib add up to {} MiB, more than [pool] size_mib = {} MiB",
                sum_min >> 20,
                pool.size_mib
            ));
        }
        let need = sum_min + specs.len() as u64 * (POOL_WORKING_MIN_MIB << 20);
        if need > size_bytes {
            return err(format!(
                "{what}: {} MiB is too small: the partitions' min_mib ({} MiB) plus {POOL_WORKING_MIN_MIB} MiB per partition to make progress need {} MiB",
                pool.size_mib,
                sum_min >> 20,
                need >> 20
            ));
        }
        let dir = pool.paging_dir.clone().unwrap_or_else(|| PathBuf::from("paging"));
        let paging_dir = if dir.is_absolute() { dir } else { base.join(dir) };
        let backend = self.paging.as_ref().map_or(PagingBackend::Local, |p| p.backend);
        if backend == PagingBackend::Vm && specs.len() > paging_server::vasi::MAX_DEVICES {
            return err(format!(
                "{origin}: [paging] backend = \"vm\": the paging server serves at most {} partitions, the config has {}",
                paging_server::vasi::MAX_DEVICES,
                specs.len()
            ));
        }
        let rotate_s = match (pool.policy, pool.rotate_s) {
            (ReclaimPolicy::Share, Some(_)) => {
                return err(format!("{origin}: [pool] rotate_s only applies with policy = \"protect\""));
            }
            (_, Some(r)) if !(1..=86_400).contains(&r) => {
                return err(format!("{origin}: [pool] rotate_s = {r}: must be between 1 and 86400 seconds"));
            }
            (_, r) => r.unwrap_or(DEFAULT_ROTATE_S),
        };
        Ok(Some(PoolSpec {
            size_bytes,
            paging_dir,
            backend,
            raw_uffd: false,
            policy: pool.policy,
            rotate: std::time::Duration::from_secs(rotate_s),
            huge_pages: self.huge_pages,
        }))
    }

    pub fn from_file(path: &Path) -> Result<Setup, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: cannot read config: {e}", path.display())))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Config::from_text(&text, path, &base)
    }

    /// A config's text, named `origin` in messages, with relative paths resolved
    /// against `base`.
    pub fn from_text(text: &str, origin: &Path, base: &Path) -> Result<Setup, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| toml_error(origin, text, &e))?;
        let origin = origin.display().to_string();
        let specs = cfg.validate(&origin, base)?;
        let pool = cfg.pool_spec(&origin, base, &specs)?;
        Ok(Setup { specs, pool })
    }

    /// Validate and resolve relative paths against `base`. `origin` names the config in
    /// error messages.
    pub fn validate(&self, origin: &str, base: &Path) -> Result<Vec<PartitionSpec>, ConfigError> {
        if self.partitions.is_empty() {
            return err(format!("{origin}: no [[partition]] defined"));
        }
        if self.partitions.len() > MAX_PARTITIONS {
            return err(format!("{origin}: {} partitions, at most {MAX_PARTITIONS} are supported", self.partitions.len()));
        }
        let resolve = |p: &Path| if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
        let log_dir = self.log_dir.as_ref().map(|d| resolve(d));
        let mut names = HashSet::new();
        let mut specs = Vec::new();
        for (i, p) in self.partitions.iter().enumerate() {
            let what = format!("{origin}: partition \"{}\"", p.name);
            if p.name.is_empty() || !p.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return err(format!("{origin}: partition #{i}: name \"{}\" must be non-empty ASCII letters, digits, '-' or '_'", p.name));
            }
            if !names.insert(p.name.clone()) {
                return err(format!("{what}: duplicate partition name"));
            }
            if p.vcpus == 0 || p.vcpus > MAX_VCPUS {
                return err(format!("{what}: vcpus = {} must be between 1 and {MAX_VCPUS}", p.vcpus));
            }
            let mem_bytes = check_mem_mib(&format!("{what}: logical_mib"), p.logical_mib, layout::MAX_RAM)?;
            if p.min_mib > p.logical_mib {
                return err(format!("{what}: min_mib ({}) is above logical_mib ({})", p.min_mib, p.logical_mib));
            }
            if self.pool.is_none()
                && (p.min_mib != 0 || p.weight != DEFAULT_WEIGHT || p.paging_file.is_some() || p.loan_policy != LoanPolicy::Default)
            {
                return err(format!("{what}: min_mib, weight, paging_file and loan_policy only apply with a [pool]"));
            }
            let boot = match (&p.image, &p.kernel) {
                (Some(_), Some(_)) => return err(format!("{what}: give either image (native) or kernel (Linux), not both")),
                (None, None) => return err(format!("{what}: give image = \"workload\" (or a native ELF path) or kernel = \"PATH\"")),
                (Some(img), None) => {
                    if p.initrd.is_some() || p.cmdline.is_some() {
                        return err(format!("{what}: initrd and cmdline only apply to Linux partitions (kernel = ...)"));
                    }
                    if p.vcpus != 1 {
                        return err(format!("{what}: native images run on one vCPU; set vcpus = 1"));
                    }
                    let image = if img == "workload" { None } else { Some(resolve(Path::new(img))) };
                    let workload = match &p.workload {
                        Some(w) => w.to_params(&what, i as u32, mem_bytes)?,
                        None if image.is_none() => {
                            return err(format!("{what}: the workload image needs a [partition.workload] table (working_set_mib at least)"))
                        }
                        None => WorkloadParams::default(),
                    };
                    BootConfig::Native { image, workload }
                }
                (None, Some(k)) => {
                    if p.workload.is_some() {
                        return err(format!("{what}: [partition.workload] only applies to native images"));
                    }
                    BootConfig::Linux {
                        kernel: resolve(k),
                        initrd: p.initrd.as_ref().map(|i| resolve(i)),
                        cmdline: p.cmdline.clone().unwrap_or_else(|| "console=ttyS0 reboot=k panic=1".into()),
                    }
                }
            };
            if p.disks.len() + 1 > layout::MAX_DEVICES {
                return err(format!("{what}: {} disks, at most {} are supported", p.disks.len(), layout::MAX_DEVICES - 1));
            }
            let disks = p
                .disks
                .iter()
                .map(|d| DiskConfig { path: resolve(&d.path), ..d.clone() })
                .collect();
            specs.push(PartitionSpec {
                role: PartitionRole::Guest,
                id: i as u32,
                name: p.name.clone(),
                mem_bytes,
                min_bytes: p.min_mib << 20,
                weight: p.weight,
                paging_file: p.paging_file.as_ref().map(|f| resolve(f)),
                loan_policy: p.loan_policy,
                vcpus: p.vcpus,
                boot,
                disks,
                console_stdout: p.console_stdout,
                log_path: log_dir.as_ref().map(|d| d.join(format!("{}.log", p.name))),
                huge_pages: self.huge_pages,
            });
        }
        Ok(specs)
    }
}

/// Guest RAM the workload's bookkeeping and image need besides its stamped pages
/// (working set and idle pages): the image and stack (below 4 MiB), the version table
/// (4 bytes per stamped page) and the virtio queues and buffers.
pub fn workload_overhead_bytes(stamped_pages: u64) -> u64 {
    4 * 1024 * 1024 + stamped_pages * 4 + 128 * 1024
}

impl WorkloadConfig {
    fn to_params(&self, what: &str, id: u32, mem_bytes: u64) -> Result<WorkloadParams, ConfigError> {
        let what = format!("{what}: workload");
        let pattern = match self.pattern.as_str() {
            "sequential" => pattern::SEQUENTIAL,
            "uniform" => pattern::UNIFORM,
            "zipf" => pattern::ZIPF,
            "hotspot" => pattern::HOTSPOT,
            other => return err(format!("{what}.pattern: unknown pattern \"{other}\"; use sequential, uniform, zipf or hotspot")),
        };
        if self.working_set_mib == 0 {
            return err(format!("{what}.working_set_mib: must be at least 1"));
        }
        let pages = self.working_set_mib.saturating_mul(256);
        let idle = self.idle_mib.saturating_mul(256);
        let stamped = pages.saturating_add(idle);
        let need = stamped.saturating_mul(4096).saturating_add(workload_overhead_bytes(stamped));
        if need > mem_bytes {
            return err(format!(
                "{what}.working_set_mib: {} MiB{} plus {} MiB of image and bookkeeping does not fit in logical_mib ({} MiB)",
                self.working_set_mib,
                if idle > 0 { format!(" and idle_mib {} MiB", self.idle_mib) } else { String::new() },
                workload_overhead_bytes(stamped).div_ceil(1 << 20),
                mem_bytes >> 20
            ));
        }
        let balloon = match self.balloon.as_str() {
            "ignore" => amsvm_abi::balloon::IGNORE,
            "cooperate" => amsvm_abi::balloon::COOPERATE,
            "report" => amsvm_abi::balloon::COOPERATE_AND_REPORT,
            other => return err(format!("{what}.balloon: unknown mode \"{other}\"; use ignore, cooperate or report")),
        };
        if self.write_pct > 100 {
            return err(format!("{what}.write_pct: {} is above 100", self.write_pct));
        }
        if self.passes == 0 && self.duration_ms == 0 {
            return err(format!("{what}: set passes or duration_ms (or both); the workload needs a limit"));
        }
        if !(0.0..=5.0).contains(&self.zipf_theta) {
            return err(format!("{what}.zipf_theta: {} must be between 0 and 5", self.zipf_theta));
        }
        if self.hot_pct == 0 || self.hot_pct > 100 {
            return err(format!("{what}.hot_pct: {} must be between 1 and 100", self.hot_pct));
        }
        if self.hot_access_pct > 100 {
            return err(format!("{what}.hot_access_pct: {} is above 100", self.hot_access_pct));
        }
        if self.turns > 1 {
            if self.turn >= self.turns {
                return err(format!("{what}.turn: {} must be below turns ({})", self.turn, self.turns));
            }
            if self.turn_ms == 0 || self.turn_ms > 3_600_000 {
                return err(format!("{what}.turn_ms: {} must be between 1 and 3600000 with turns > 1", self.turn_ms));
            }
            if self.quiet_pct == 0 || self.quiet_pct > 100 {
                return err(format!("{what}.quiet_pct: {} must be between 1 and 100", self.quiet_pct));
            }
        }
        Ok(WorkloadParams {
            working_set_pages: pages,
            pattern,
            write_pct: self.write_pct,
            passes: self.passes,
            duration_ms: self.duration_ms,
            seed: self.seed ^ ((id as u64) << 32),
            zipf_theta_milli: (self.zipf_theta * 1000.0).round() as u32,
            hot_pct: self.hot_pct,
            hot_access_pct: self.hot_access_pct,
            chaos: u32::from(self.chaos),
            phase_accesses: if self.phase_accesses == 0 { pages * 2 } else { self.phase_accesses },
            report_every: self.report_every,
            disk_test_blocks: self.disk_test_blocks,
            latency_from: self.latency_from.unwrap_or(u64::MAX),
            measure_latency: u32::from(self.latency_from.is_some()),
            balloon,
            idle_pages: idle,
            turn_ms: self.turn_ms,
            turns: self.turns,
            turn: self.turn,
            quiet_pct: self.quiet_pct,
            balloon_silent_ms: self.balloon_silent_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<PartitionSpec>, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        Config::from_file(&path).map(|s| s.specs)
    }

    const GOOD: &str = r#"
[[partition]]
name = "a"
logical_mib = 64
image = "workload"
[partition.workload]
working_set_mib = 16
passes = 2
"#;

    #[test]
    fn good_config_resolves() {
        let s = parse(GOOD).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].mem_bytes, 64 << 20);
        match &s[0].boot {
            BootConfig::Native { image: None, workload } => {
                assert_eq!(workload.working_set_pages, 16 * 256);
                assert_eq!(workload.passes, 2);
            }
            b => panic!("unexpected boot {b:?}"),
        }
    }

    #[test]
    fn errors_name_file_and_field() {
        let e = parse("[[partition]]\nname = \"a\"\nlogical_mib = 64\nimage = \"workload\"\nbogus = 1\n").unwrap_err().0;
        assert!(e.contains("c.toml:5") && e.contains("bogus"), "{e}");
        let e = parse(&format!("{GOOD}{}", GOOD)).unwrap_err().0;
        assert!(e.contains("partition \"a\"") && e.contains("duplicate"), "{e}");
        let e = parse(&GOOD.replace("logical_mib = 64", "logical_mib = 0")).unwrap_err().0;
        assert!(e.contains("logical_mib") && e.contains("0 MiB"), "{e}");
        let e = parse(&GOOD.replace("logical_mib = 64", "logical_mib = 99999999")).unwrap_err().0;
        assert!(e.contains("larger than this host"), "{e}");
        let e = parse(&GOOD.replace("working_set_mib = 16", "working_set_mib = 64")).unwrap_err().0;
        assert!(e.contains("working_set_mib") && e.contains("does not fit"), "{e}");
        let e = parse(&GOOD.replace("passes = 2", "")).unwrap_err().0;
        assert!(e.contains("passes or duration_ms"), "{e}");
        let e = parse("").unwrap_err().0;
        assert!(e.contains("no [[partition]]"), "{e}");
        assert!(!e.contains('\n'));
        let e = parse(&GOOD.replace("logical_mib = 64", "logical_mib = 64\nmin_mib = 8")).unwrap_err().0;
        assert!(e.contains("only apply with a [pool]"), "{e}");
        let turns = |t: &str| parse(&GOOD.replace("passes = 2", &format!("passes = 2\n{t}")));
        let specs = turns("turn_ms = 500\nturns = 4\nturn = 3\nquiet_pct = 30").unwrap();
        let BootConfig::Native { workload: w, .. } = &specs[0].boot else { panic!("a native partition") };
        assert_eq!((w.turn_ms, w.turns, w.turn, w.quiet_pct), (500, 4, 3, 30));
        let e = turns("turn_ms = 500\nturns = 4\nturn = 4").unwrap_err().0;
        assert!(e.contains("workload.turn: 4 must be below turns (4)"), "{e}");
        let e = turns("turns = 2").unwrap_err().0;
        assert!(e.contains("workload.turn_ms: 0"), "{e}");
        let e = turns("turn_ms = 9\nturns = 2\nquiet_pct = 0").unwrap_err().0;
        assert!(e.contains("workload.quiet_pct: 0"), "{e}");
    }

    fn parse_setup(text: &str) -> Result<Setup, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, text).unwrap();
        Config::from_file(&path)
    }

    #[test]
    fn pool_sums_are_checked() {
        let two = |min: u64| {
            format!("[pool]\nsize_mib = 64\n{}{}", GOOD.replace("logical_mib = 64", &format!("logical_mib = 64\nmin_mib = {min}")), GOOD.replace("\"a\"", "\"b\"").replace("logical_mib = 64", &format!("logical_mib = 64\nmin_mib = {min}")))
        };
        let s = parse_setup(&two(8)).unwrap();
        let pool = s.pool.unwrap();
        assert_eq!(pool.size_bytes, 64 << 20);
        assert!(pool.paging_dir.ends_with("paging"));
        assert_eq!(s.specs[0].min_bytes, 8 << 20);
        let e = parse_setup(&two(40)).unwrap_err().0;
        assert!(e.contains("add up to 80 MiB") && e.contains("size_mib = 64"), "{e}");
        let e = parse_setup(&two(32)).unwrap_err().0;
        assert!(e.contains("too small"), "{e}");
        let e = parse_setup(&two(65)).unwrap_err().0;
        assert!(e.contains("min_mib (65) is above logical_mib (64)"), "{e}");
    }

    #[test]
    fn pool_policy_and_rotation() {
        let with = |extra: &str| parse_setup(&format!("[pool]\nsize_mib = 64\n{extra}\n{GOOD}"));
        let p = with("").unwrap().pool.unwrap();
        assert_eq!((p.policy, p.rotate), (ReclaimPolicy::Share, std::time::Duration::from_secs(DEFAULT_ROTATE_S)));
        let p = with("policy = \"protect\"\nrotate_s = 30").unwrap().pool.unwrap();
        assert_eq!((p.policy, p.rotate), (ReclaimPolicy::Protect, std::time::Duration::from_secs(30)));
        let e = with("policy = \"fair\"").unwrap_err().0;
        assert!(e.contains("p.toml:3") && e.contains("fair") && e.contains("share") && e.contains("protect"), "{e}");
        let e = with("rotate_s = 30").unwrap_err().0;
        assert!(e.contains("rotate_s only applies with policy = \"protect\""), "{e}");
        let e = with("policy = \"protect\"\nrotate_s = 0").unwrap_err().0;
        assert!(e.contains("rotate_s = 0: must be between 1 and 86400"), "{e}");
    }

    #[test]
    fn huge_pages_are_on_by_default_for_the_pool_and_every_partition() {
        let with = |top: &str| parse_setup(&format!("{top}\n[pool]\nsize_mib = 64\n{GOOD}"));
        let s = with("").unwrap();
        assert!(s.pool.unwrap().huge_pages && s.specs.iter().all(|p| p.huge_pages), "on by default");
        let s = with("huge_pages = false").unwrap();
        assert!(!s.pool.unwrap().huge_pages && s.specs.iter().all(|p| !p.huge_pages));
        let s = parse_setup(&format!("huge_pages = false\n{GOOD}")).unwrap();
        assert!(s.pool.is_none() && s.specs.iter().all(|p| !p.huge_pages), "partitions without a pool follow it too");
        let e = with("huge_pages = \"yes\"").unwrap_err().0;
        assert!(e.contains("p.toml:1") && e.contains("expected a boolean"), "{e}");
        // It is a setting of all guest memory, not of the pool.
        let e = parse_setup(&format!("[pool]\nsize_mib = 64\nhuge_pages = true\n{GOOD}")).unwrap_err().0;
        assert!(e.contains("p.toml:3") && e.contains("huge_pages"), "{e}");
    }
}
