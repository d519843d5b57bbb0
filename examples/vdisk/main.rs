//! `vdisk`: a qemu-img-like command line for the vdisk crate family.
//!
//! ```text
//! vdisk info [--output json] IMG
//! vdisk create -f raw|vhd|vhdx [-o k=v,...] [-b PARENT] IMG [SIZE]
//! vdisk convert [-f FMT] -O raw|vhd|vhdx [-o k=v,...] [-p] [-m N] [--rate B/S] SRC DST
//! vdisk convert --keep-layers -O vhd|vhdx [-o block_size=B] [-p] SRC DST   chain layer by layer
//! vdisk compare A B                  exit 0 same, 1 different, 2 error
//! vdisk check [-r [leaks|all]] IMG  exit 0 clean, 2 corrupt
//! vdisk map --output json IMG
//! vdisk measure [-f FMT] -O FMT [-o OPTS] [--size SIZE] [--output json] [SRC]
//! vdisk rebase -u -b NEWPARENT [-f FMT] IMG   relink a child to its moved parent (no copy)
//! vdisk resize [--shrink [--force]] [-f FMT] IMG [+|-]SIZE   change the virtual size
//! vdisk compact [-p] [--rate B/S] IMG   return unused space (online compact job)
//! vdisk split IMG --layers N [--hot-list FILE] [-O vhdx|vhd] [--prefix OUT]   a boot-ordered chain
//! vdisk mirror --to nbd://HOST:PORT/NAME [--timing before|after|split] [--rate B/S] [-p] IMG
//! vdisk io [-r] IMG -c CMD ...       read/write [-P byte] OFF LEN, write -z, discard, flush
//! vdisk token read|write|inspect ...  ODX-style offload tokens on local images
//! vdisk provider serve --listen ADDR --root DIR   an offload provider daemon
//! vdisk offload copy --from ADDR:PATH[@OFF+LEN] --to ADDR:PATH[@OFF] [--relay]   S -> D copy
//! vdisk stress IMG --job copy|convert --seconds N [--threads T] [--rate B/S]   online job + model
//! vdisk send IMG [--since SNAP] [-o FILE] [--level auto|N] [--threads N] [--rate B/S] [-p]
//! vdisk receive DEST [-O raw|vhd|vhdx] [-i FILE] [-p]   make (or update) DEST from a stream
//! vdisk receive --resume DEST        finish an interrupted incremental receive (its journal)
//! vdisk demo                         a guided tour in a temporary folder
//! vdisk serve --socket PATH [--queues N] [--workers N] [--read-only] [--cache none|writeback]
//!             [--aio io_uring|threads|sync] IMG   vhost-user-blk until SIGINT/SIGTERM
//! vdisk serve --nbd ADDR[:PORT] | --nbd-socket PATH [--export NAME] [--read-only] IMG   NBD
//!             [--tls-creds DIR [--tls-verify-peer]]
//! vdisk bench [-c N] [-d N] [-s SIZE] [-S STEP] [-o OFF] [-w] [--pattern B] [-t none|writeback]
//!             [-i io_uring|threads] IMG      qemu-img bench's workload through the I/O engine
//! ```
//! Images may be URLs: `http(s)://` and `s3://` (read-only), `nbd://`, `nbd+unix://`, `nbds://`
//! (`--nbd-tls-creds DIR`); `convert SRC nbd://...` writes into the export, `convert SRC
//! s3://...` uploads. Differencing children may have URL parents (`create -b URL`; an NBD
//! parent that advertises no identity needs `--unverified-nbd-parents`).
//! Errors go to stderr as one sentence, with a non-zero exit.
#![allow(clippy::print_stdout)]

mod bench;
mod cmds;
mod commit;
mod compact;
mod control;
mod convert;
mod demo;
mod guard;
mod image;
mod info;
mod io_cmd;
mod jobs;
mod measure;
mod mirror;
mod nbd_serve;
mod provider;
mod rebase;
mod remote;
mod resize;
mod send;
mod serve;
mod size;
mod split;
mod stream;
mod token;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Virtual disk tool: VHD, VHDX and raw images.
#[derive(Debug, Parser)]
#[command(name = "vdisk", version, about)]
struct Cli {
    /// Open images without image locks (qemu-img's -U/--force-share): only when nothing
    /// else may write them meanwhile.
    #[arg(short = 'U', long = "force-share", global = true)]
    force_share: bool,
    /// TLS credentials for nbds:// (and nbd://) URLs, laid out as qemu's tls-creds-x509 for a
    /// client: ca-cert.pem, optionally client-cert.pem and client-key.pem.
    #[arg(long = "nbd-tls-creds", value_name = "DIR", global = true)]
    nbd_tls_creds: Option<PathBuf>,
    /// Accept NBD parents that advertise no identity (qemu-nbd, nbdkit, raw images), checked
    /// by a content fingerprint (size and 16 sampled blocks) only.
    #[arg(long = "unverified-nbd-parents", global = true)]
    unverified_nbd_parents: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Show what an image is.
    Info {
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// Show every layer of a differencing chain and whether each link verifies.
        #[arg(long)]
        backing_chain: bool,
        /// Image format (detected by content if absent).
        #[arg(short = 'f')]
        format: Option<String>,
        /// Image file.
        image: PathBuf,
    },
    /// Create an image.
    Create {
        /// Format: raw, vhd, vhdx.
        #[arg(short = 'f', default_value = "raw")]
        format: String,
        /// Options, k=v[,k=v...] (repeatable).
        #[arg(short = 'o')]
        options: Vec<String>,
        /// Parent image (makes a differencing child).
        #[arg(short = 'b')]
        backing: Option<PathBuf>,
        /// Image file to create.
        image: PathBuf,
        /// Virtual size, with optional K/M/G/T suffix.
        size: Option<String>,
    },
    /// Copy an image into another format (a chain flattened, or layer by layer with
    /// --keep-layers).
    Convert {
        /// Source format (detected if absent).
        #[arg(short = 'f')]
        format: Option<String>,
        /// Destination format: raw, vhd, vhdx.
        #[arg(short = 'O', default_value = "raw")]
        out_format: String,
        /// Destination options, k=v[,k=v...].
        #[arg(short = 'o')]
        options: Vec<String>,
        /// Show progress.
        #[arg(short = 'p')]
        progress: bool,
        /// Bytes per second at most (K/M/G suffixes; default unlimited).
        #[arg(long)]
        rate: Option<String>,
        /// Requests in flight (as qemu-img convert -m; default 8).
        #[arg(short = 'm')]
        parallel: Option<usize>,
        /// Convert a differencing chain layer by layer (-O vhd or vhdx) instead of flattening
        /// it: DST is the new top, its parents go next to it as DST-STEM-1.EXT (the top's
        /// parent), DST-STEM-2.EXT, ... down to the base, each holding what the matching
        /// source layer holds and linked to its new parent. Refused if any of those names
        /// exists or is a source layer; on failure nothing is left behind. Only -o
        /// block_size is taken (for every layer). For images nobody else has open (the
        /// layers are locked: a served image is refused). A source without parents gives
        /// one plain image.
        #[arg(long)]
        keep_layers: bool,
        /// Source image.
        src: PathBuf,
        /// Destination image.
        dst: PathBuf,
    },
    /// Bytes a new image needs: for a convert of SRC, or an empty one of --size (as
    /// qemu-img measure, which measures neither VHD nor VHDX).
    Measure {
        /// Source format (detected if absent).
        #[arg(short = 'f')]
        format: Option<String>,
        /// Format to measure: raw, vhd, vhdx.
        #[arg(short = 'O', default_value = "raw")]
        out_format: String,
        /// Its options, k=v[,k=v...] (as for create and convert).
        #[arg(short = 'o')]
        options: Vec<String>,
        /// Size of an empty image, instead of a source.
        #[arg(long)]
        size: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// Source image.
        src: Option<PathBuf>,
    },
    /// Compare the contents of two images (exit 0 same, 1 different).
    Compare {
        /// Format of the first image.
        #[arg(short = 'f')]
        format_a: Option<String>,
        /// Format of the second image.
        #[arg(short = 'F')]
        format_b: Option<String>,
        /// Strict: images of different sizes differ even if the excess is zeros.
        #[arg(short = 's')]
        strict: bool,
        /// First image.
        a: PathBuf,
        /// Second image.
        b: PathBuf,
    },
    /// Check an image's consistency (exit 0 clean).
    Check {
        /// Repair what is safe to repair: `-r`, `-r leaks` or `-r all` (the same here: the
        /// only repairs are replaying a VHDX log and rewriting a VHD footer copy).
        #[arg(short = 'r', num_args = 0..=1, default_missing_value = "all")]
        repair: Option<String>,
        /// Image format (detected if absent).
        #[arg(short = 'f')]
        format: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// Image file (optional here only so that `-r IMG` parses; required).
        image: Option<PathBuf>,
    },
    /// Show which ranges hold data, zeros, or nothing.
    Map {
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// Image format (detected if absent).
        #[arg(short = 'f')]
        format: Option<String>,
        /// Image file.
        image: PathBuf,
    },
    /// Run qemu-io-like commands against an image.
    Io {
        /// Open read-only.
        #[arg(short = 'r')]
        read_only: bool,
        /// Image format (detected if absent).
        #[arg(short = 'f')]
        format: Option<String>,
        /// A command: read/write [-P byte] OFF LEN, write -z OFF LEN, discard OFF LEN, flush.
        #[arg(short = 'c', required = true)]
        commands: Vec<String>,
        /// Image file.
        image: PathBuf,
    },
    /// Serve an image to a VM over vhost-user-blk until SIGINT/SIGTERM.
    Serve {
        /// Unix socket to listen on for vhost-user-blk (QEMU: -chardev socket,path=PATH).
        #[arg(long, required_unless_present_any = ["nbd", "nbd_socket"],
              conflicts_with_all = ["nbd", "nbd_socket"])]
        socket: Option<PathBuf>,
        /// Serve over NBD on TCP instead: ADDR[:PORT] (port 10809 when absent).
        #[arg(long, conflicts_with = "nbd_socket")]
        nbd: Option<String>,
        /// Serve over NBD on this Unix socket instead.
        #[arg(long)]
        nbd_socket: Option<PathBuf>,
        /// NBD export name ("" is the default export).
        #[arg(long, default_value = "")]
        export: String,
        /// NBD: require TLS with the x509 credentials in DIR, as qemu-nbd --tls-creds
        /// (ca-cert.pem, server-cert.pem, server-key.pem).
        #[arg(long, value_name = "DIR", conflicts_with = "socket")]
        tls_creds: Option<PathBuf>,
        /// NBD with --tls-creds: clients must present a certificate signed by ca-cert.pem.
        #[arg(long, requires = "tls_creds")]
        tls_verify_peer: bool,
        /// Number of request queues.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
        queues: u16,
        /// Worker threads serving the queues, each with its own I/O engine (default: one per
        /// queue, at most half the host's cores).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
        workers: Option<u16>,
        /// Refuse writes (the guest sees a read-only disk).
        #[arg(long)]
        read_only: bool,
        /// Cache mode: none (O_DIRECT on every layer) or writeback (the page cache, with host
        /// readahead off: the guest reads ahead itself).
        #[arg(long, default_value = "writeback")]
        cache: String,
        /// How each queue runs its reads and writes: io_uring or threads (many in flight
        /// either way), or sync (one at a time on the queue's worker thread).
        #[arg(long, default_value = "io_uring")]
        aio: String,
        /// vhost-user: a control socket for online operations while the VM runs (resize,
        /// commit, compact, convert, backup, job control; `vdisk control PATH help`).
        #[arg(long, value_name = "PATH", requires = "socket")]
        control: Option<PathBuf>,
        /// Image file.
        image: PathBuf,
    },
    /// Point a differencing image at another parent, keeping its content (as qemu-img rebase;
    /// -u: only relink onto a moved or copied parent, same content verified).
    Rebase {
        /// Unsafe (no copy): change only the parent link; the new parent must be the same
        /// content as the old one. Without -u, the data the image reads through its old parent
        /// and would read differently through the new one is copied into it first.
        #[arg(short = 'u')]
        unsafe_: bool,
        /// Show a progress bar (copying rebase).
        #[arg(short = 'p')]
        progress: bool,
        /// The new parent image.
        #[arg(short = 'b')]
        backing: PathBuf,
        /// Format of the image (detected if absent).
        #[arg(short = 'f')]
        format: Option<String>,
        /// The differencing image to rebase.
        image: PathBuf,
    },
    /// Fold an image into its backing file (or a deeper one, -b), as qemu-img commit.
    Commit(commit::CommitArgs),
    /// Change an image's virtual size ([+|-]SIZE), as qemu-img resize.
    Resize(resize::ResizeArgs),
    /// Return a VHD's or VHDX's unused space: empty blocks freed, blocks moved down, file cut.
    Compact(compact::CompactArgs),
    /// Cut a base image into a chain of N layers, the blocks a boot reads first at the bottom.
    Split(split::SplitArgs),
    /// Move a disk to an NBD export on another host (the mirror job; timing before|after|split).
    Mirror(mirror::MirrorArgs),
    /// Pull a child's remote base into a local replica, then make it the local parent.
    Stream(stream::StreamArgs),
    /// Send one request to the control socket of `vdisk serve --control` (resize, commit,
    /// compact, convert, backup, job, job-wait, ...).
    Control(control::ControlArgs),
    /// Measure I/O on an image as qemu-img bench does (same flags), through the I/O engine.
    Bench(bench::BenchArgs),
    /// Random guest I/O against a model while an online job runs on the image; one JSON line.
    Stress(jobs::StressArgs),
    /// Offload tokens (ODX): mint, redeem, inspect.
    Token(token::TokenArgs),
    /// An offload provider daemon serving the images under a folder.
    Provider(provider::ProviderArgs),
    /// Offload copies between two providers (the initiator).
    Offload(provider::OffloadArgs),
    /// Write an image's allocated data (or its changes since a snapshot) as a stream.
    Send(send::SendArgs),
    /// Make or update an image from a `vdisk send` stream.
    Receive(send::ReceiveArgs),
    /// A guided tour of the family in a temporary folder.
    Demo {
        /// Keep the temporary folder and print its path.
        #[arg(long)]
        keep: bool,
    },
}

/// An error for the user: one sentence, and the exit code to leave with.
#[derive(Debug)]
pub struct CliError {
    message: String,
    code: u8,
}

impl CliError {
    /// An error exiting with 1.
    pub fn new(message: impl Into<String>) -> Self {
        CliError {
            message: message.into(),
            code: 1,
        }
    }

    /// An error exiting with `code`.
    pub fn with_code(message: impl Into<String>, code: u8) -> Self {
        CliError {
            message: message.into(),
            code,
        }
    }
}

impl From<block_io::Error> for CliError {
    fn from(e: block_io::Error) -> Self {
        CliError::new(e.chain_string())
    }
}

impl From<chain::ChainError> for CliError {
    /// The chain's own sentence (it names the image and the rule), then every cause.
    fn from(e: chain::ChainError) -> Self {
        CliError::new(cause_chain(&e))
    }
}

/// A job's error for the user, with its causes ([`cause_chain`]).
pub fn job_err(e: vdisk::meta_ops::JobError) -> CliError {
    CliError::new(cause_chain(&e))
}

/// An error and all its sources in one line: "cannot open a.vhdx: metadata: block size 0".
/// A source whose text the message already holds is not repeated.
pub fn cause_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// What every subcommand returns: the exit code on success.
pub type CliResult = Result<u8, CliError>;

use vdisk::{block_io, chain};

fn main() -> ExitCode {
    // Like other Unix tools, end quietly when the reader of our output goes away
    // (`vdisk map IMG | head`) instead of panicking in println!.
    // SAFETY: restoring the default action of a signal; no handler runs Rust code.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    image::set_force_share(cli.force_share);
    remote::set_nbd_tls_creds(cli.nbd_tls_creds);
    remote::set_unverified_nbd_parents(cli.unverified_nbd_parents);
    let result = match cli.cmd {
        Cmd::Info {
            output,
            backing_chain,
            format,
            image,
        } => info::run(
            &image,
            format.as_deref(),
            output == Output::Json,
            backing_chain,
        ),
        Cmd::Create {
            format,
            options,
            backing,
            image,
            size,
        } => cmds::create(
            &format,
            &options,
            backing.as_deref(),
            &image,
            size.as_deref(),
        ),
        Cmd::Convert {
            format,
            out_format,
            options,
            progress,
            rate,
            parallel,
            keep_layers: true,
            src,
            dst,
        } => {
            if rate.is_some() || parallel.is_some() {
                Err(CliError::new(
                    "--keep-layers takes no --rate or -m (it writes one layer at a time)",
                ))
            } else {
                convert::keep_layers(
                    format.as_deref(),
                    &out_format,
                    &options,
                    progress,
                    &src,
                    &dst,
                )
            }
        }
        Cmd::Convert {
            format,
            out_format,
            options,
            progress,
            rate,
            parallel,
            keep_layers: false,
            src,
            dst,
        } => rate
            .as_deref()
            .map(size::parse_size)
            .transpose()
            .and_then(|rate| {
                let copy = convert::CopyOptions {
                    rate: rate.unwrap_or(0),
                    parallel: parallel.unwrap_or(8),
                    progress,
                };
                cmds::convert(format.as_deref(), &out_format, &options, &copy, &src, &dst)
            }),
        Cmd::Measure {
            format,
            out_format,
            options,
            size,
            output,
            src,
        } => size
            .as_deref()
            .map(size::parse_size)
            .transpose()
            .and_then(|size| {
                measure::measure(
                    src.as_deref().map(|p| (p, format.as_deref())),
                    size,
                    &out_format,
                    &options,
                )
            })
            .map(|m| {
                measure::print(&m, output == Output::Json);
                0
            }),
        Cmd::Compare {
            format_a,
            format_b,
            strict,
            a,
            b,
        } => cmds::compare(&a, format_a.as_deref(), &b, format_b.as_deref(), strict),
        Cmd::Check {
            repair,
            format,
            output,
            image,
        } => cmds::check_repair_mode(repair, image).and_then(|(repair, image)| {
            cmds::check(&image, format.as_deref(), repair, output == Output::Json)
        }),
        Cmd::Map {
            output,
            format,
            image,
        } => cmds::map(&image, format.as_deref(), output == Output::Json),
        Cmd::Io {
            read_only,
            format,
            commands,
            image,
        } => io_cmd::run(&image, format.as_deref(), read_only, &commands),
        Cmd::Rebase {
            unsafe_,
            progress,
            backing,
            format,
            image,
        } => rebase::run(&image, &backing, format.as_deref(), unsafe_, progress),
        Cmd::Demo { keep } => demo::run(keep),
        Cmd::Bench(args) => bench::run(args),
        Cmd::Token(args) => token::run(args),
        Cmd::Provider(args) => provider::run_provider(args),
        Cmd::Offload(args) => provider::run_offload(args),
        Cmd::Stress(args) => jobs::run(args),
        Cmd::Commit(args) => commit::run(args),
        Cmd::Resize(args) => resize::run(args),
        Cmd::Compact(args) => compact::run(args),
        Cmd::Split(args) => split::run(args),
        Cmd::Send(args) => send::run_send(args),
        Cmd::Receive(args) => send::run_receive(args),
        Cmd::Mirror(args) => mirror::run(args),
        Cmd::Stream(args) => stream::run(args),
        Cmd::Control(args) => control::run_client(args),
        Cmd::Serve {
            socket,
            queues,
            workers,
            read_only,
            cache,
            aio,
            nbd,
            nbd_socket,
            export,
            tls_creds,
            tls_verify_peer,
            control,
            image,
        } => match (socket, nbd, nbd_socket) {
            (Some(socket), None, None) => serve::run(
                &image,
                &socket,
                queues,
                &serve::Mode {
                    workers,
                    read_only,
                    cache,
                    aio,
                    control,
                },
            ),
            (None, Some(addr), None) => nbd_serve::run(
                &image,
                nbd_serve::NbdListen::Tcp(addr),
                &export,
                read_only,
                &nbd_serve::Tls {
                    creds: tls_creds,
                    verify_peer: tls_verify_peer,
                },
            ),
            (None, None, Some(path)) => nbd_serve::run(
                &image,
                nbd_serve::NbdListen::Unix(path),
                &export,
                read_only,
                &nbd_serve::Tls {
                    creds: tls_creds,
                    verify_peer: tls_verify_peer,
                },
            ),
            _ => Err(CliError::new("give one of --socket, --nbd or --nbd-socket")),
        },
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("vdisk: {}", e.message);
            ExitCode::from(e.code.max(1))
        }
    }
}
