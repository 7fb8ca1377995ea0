//! `netwatch run`: attach, serve metrics, reload on SIGHUP, detach on exit.

use std::{collections::HashSet, path::PathBuf, sync::Arc, time::Duration};

use aya::maps::RingBuf;
use netwatch_common::maps;
use tokio::io::{Interest, unix::AsyncFd};

use anyhow::{Context as _, Result, bail};
use log::{debug, error, info, warn};
use sd_notify::NotifyState;
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::{
    cli::RunArgs,
    config::{ConfigSource, Overrides, PIN_DIR_ENV, RunConfig, STATE_DIR_ENV},
    datapath::{self, Datapath, LinkEvent, LinkEvents, install},
    detection::{
        contacts::Contacts,
        detector::{Detector, MAX_RECOVERED_PER_WALK, parse_event},
        sources,
    },
    fleet::{FleetStats, Publisher},
    observe::{
        http::{self, AppState},
        metrics::{ControllerStats, Metrics},
    },
};

/// What `run`'s loop shares with the fleet thread.
#[derive(Default)]
struct Fleet {
    stats: Arc<FleetStats>,
    /// Wakes the fleet thread when incidents were written.
    notify: Arc<tokio::sync::Notify>,
}

fn overrides(args: &RunArgs) -> Overrides {
    // flag > environment > config file > default
    let env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    Overrides {
        mode: args.mode,
        metrics_addr: args.metrics_addr,
        pin_dir: args.pin_dir.clone().or_else(|| env(PIN_DIR_ENV)),
        state_dir: args.state_dir.clone().or_else(|| env(STATE_DIR_ENV)),
        interfaces: args.interfaces.clone(),
        egress: args.egress.clone(),
        rules: args.rules.clone(),
        allowlist: args.allowlist.clone(),
        blocklist: args.blocklist.clone(),
        keep_attached: args.keep_attached,
        tc_attach: args.tc_attach,
        fleet_url: args.fleet.clone(),
        sensor: args.sensor.clone(),
    }
}

/// Reads the config file (the default one only if it exists) and merges
/// the flags over it.
pub fn load_config(args: &RunArgs, source: &ConfigSource) -> Result<RunConfig> {
    let file = source.load()?;
    let built = RunConfig::build(file.as_ref(), &overrides(args));
    // Errors name the file only when there is one (flags can be at fault).
    let config = match file {
        Some(_) => built.with_context(|| format!("config file {}", source.path.display()))?,
        None => built?,
    };
    if config.interfaces.is_empty() && config.egress.is_empty() {
        bail!(
            "no interface to attach to: give --iface IFACE[:wan|lan|host] or --egress IFACE, or set `interfaces` or `egress` in {}",
            source.path.display()
        );
    }
    Ok(config)
}

/// What `run` checks against this host before attaching anything: every
/// interface exists in this network namespace and has a link type the
/// programs can parse.
pub fn check_interfaces(config: &RunConfig) -> Result<()> {
    let named = config
        .interfaces
        .iter()
        .map(|i| ("interfaces", &i.name))
        .chain(config.egress.iter().map(|e| ("egress", e)));
    for (key, name) in named {
        datapath::ifindex(name)
            .and_then(|_| datapath::link_kind(name))
            .with_context(|| format!("{key}: {name:?}"))?;
    }
    Ok(())
}

/// The signals `run` handles, installed before anything is attached (and
/// held back while attaching, see [`HoldSignals`]): a SIGHUP or SIGTERM
/// arriving meanwhile is handled by the main loop once it runs, never
/// fatal with links in place.
struct Signals {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl Signals {
    /// Needs to run inside the tokio runtime's context.
    fn install() -> Result<Self> {
        Ok(Signals {
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            hup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
        })
    }
}

/// SIGHUP, SIGTERM and SIGINT held back (blocked in this thread, and so
/// in every thread it starts) while the programs are loaded and attached:
/// the verifier gives up on a load with a signal pending (EAGAIN), so a
/// `systemctl reload` or stop arriving then would fail the start. They
/// stay pending and reach the handlers once this is dropped.
struct HoldSignals {
    old: libc::sigset_t,
}

impl HoldSignals {
    fn new() -> Result<Self> {
        // SAFETY: sigset_t is plain data, initialised by sigemptyset;
        // pthread_sigmask only reads `set` and writes `old`.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in [libc::SIGHUP, libc::SIGTERM, libc::SIGINT] {
                libc::sigaddset(&mut set, sig);
            }
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
            if rc != 0 {
                bail!("blocking signals: {}", std::io::Error::from_raw_os_error(rc));
            }
            Ok(HoldSignals { old })
        }
    }
}

impl Drop for HoldSignals {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `new`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut()) };
    }
}

/// Tells systemd (Type=notify), if it is listening; a failure is logged,
/// never fatal.
fn notify(states: &[NotifyState]) {
    if let Err(err) = sd_notify::notify(states) {
        warn!("sd_notify: {err}");
    }
}

pub fn run(args: RunArgs, source: &ConfigSource) -> Result<()> {
    let held = HoldSignals::new()?;
    let config = load_config(&args, source)?;
    // A state directory netwatch would have to take over is refused
    // before anything is made.
    crate::detection::state_dir::check_state_dir(&config.state_dir)?;
    // Check every interface before attaching anything.
    check_interfaces(&config)?;
    // Before loading anything: a kernel without what the programs use is
    // refused with the missing feature's name, not a verifier dump.
    crate::features::check()?;
    for name in &config.egress {
        datapath::tc::resolve(config.tc_attach, datapath::tc::tcx_supported(name)?, name)?;
    }

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let signals = {
        let _context = runtime.enter();
        Signals::install()?
    };

    let listener = http::bind(config.metrics_addr)?;
    let mut datapath = Datapath::open(&config.pin_dir, args.allow_private_bpffs)?;
    datapath.apply(&config.policy)?;
    // Before attaching: a credentials file that cannot be read fails the
    // start; a server that cannot be reached does not (incidents wait in
    // the outbox).
    let fleet = match &config.fleet {
        Some(fleet) => {
            let link = Fleet::default();
            let applies = fleet.confirmation.apply && config.policy.mode == crate::policy::Mode::Enforce;
            Publisher::start(
                fleet,
                &config.state_dir,
                link.stats.clone(),
                link.notify.clone(),
                applies.then(|| datapath.maps().clone()),
            )?;
            info!(
                "fleet: sensor {} delivering incidents to {}{}",
                fleet.sensor,
                fleet.url,
                if applies {
                    ", applying the fleet's decisions"
                } else {
                    ""
                }
            );
            Some(link)
        }
        None => None,
    };
    info!(
        "mode {}, rules: {}",
        config.policy.mode.label(),
        config
            .policy
            .rules
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join("; ")
    );
    datapath.attach(&config.interfaces, &config.egress, config.tc_attach, args.xdp_generic)?;

    // Signals that came while attaching are delivered to the handlers now.
    drop(held);
    let result = runtime.block_on(serve_until_signal(
        &args,
        source,
        &config,
        &mut datapath,
        listener,
        signals,
        fleet,
    ));
    notify(&[NotifyState::Stopping]);
    // keep_attached as the last reload left it.
    let keep_attached = result.as_ref().map_or(config.keep_attached, |c| c.keep_attached);

    if keep_attached {
        info!("leaving programs attached (keep_attached); `netwatch detach` removes them");
        datapath.leave_attached();
    } else {
        datapath.detach()?;
        info!("detached; counters stay pinned in {}", config.pin_dir.display());
    }
    result.map(drop)
}

/// How often open incidents are brought up to date from the kernel (and
/// expired auto-blocks swept).
const REFRESH_EVERY: Duration = Duration::from_secs(5);
/// How long link notifications settle before the interfaces are looked
/// at: a burst (an interface made, renamed, brought up) is handled once.
const LINK_SETTLE: Duration = Duration::from_millis(100);
/// How often first contacts past their answer time are judged (see
/// `detection::contacts`).
const JUDGE_CONTACTS_EVERY: Duration = Duration::from_millis(500);
/// How often the per-source map is walked: the tracked sources counted
/// (never at scrape time), flags whose events were lost recorded.
const COUNT_EVERY: Duration = Duration::from_secs(30);

async fn serve_until_signal(
    args: &RunArgs,
    source: &ConfigSource,
    config: &RunConfig,
    datapath: &mut Datapath,
    listener: std::net::TcpListener,
    mut signals: Signals,
    fleet: Option<Fleet>,
) -> Result<RunConfig> {
    let maps = &datapath.maps().clone();
    // The configuration in force when the loop ends.
    let stats = Arc::new(ControllerStats::default());
    if let Some(fleet) = &fleet {
        stats.set_fleet(fleet.stats.clone());
    }
    let mut detector = {
        let stats = stats.clone();
        Detector::open_with(
            maps,
            &config.state_dir,
            crate::detection::detector::Options {
                retention: config.incident_retention,
                summary_after: config.incidents_per_minute,
                on_error: Arc::new(move || stats.incident_error()),
                outbox: fleet.as_ref().map(|f| f.notify.clone()),
            },
        )?
    };
    let state = AppState {
        fleet: config.fleet.clone(),
        ..AppState::new(
            maps.clone(),
            config.state_dir.clone(),
            Arc::new(Metrics::new(maps.clone(), stats.clone())?),
        )
    };
    let server = http::serve(listener, state)?;
    info!(
        "metrics at http://{}/metrics, incidents in {}",
        config.metrics_addr,
        config.state_dir.display()
    );

    let events = RingBuf::try_from(maps.map_by_name(maps::EVENTS)?)?;
    // SAFETY: the ring buffer owns its fd and is only moved into AsyncFd,
    // which keeps it until it is dropped.
    let mut events = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE)? };
    let mut refresh = tokio::time::interval(REFRESH_EVERY);
    let mut contacts = Contacts::open(maps)?;
    let mut judge = tokio::time::interval(JUDGE_CONTACTS_EVERY);
    let mut count = tokio::time::interval(COUNT_EVERY);
    let mut counting: Option<tokio::task::JoinHandle<Result<sources::Census>>> = None;
    // Interfaces deleted, re-created or renamed while running: followed on
    // the kernel's link notifications, and on every refresh in case one
    // was missed.
    let mut links = match LinkEvents::subscribe() {
        Ok(links) => Some(links),
        Err(err) => {
            warn!(
                "interface changes are followed every {} s only: {err:#}",
                REFRESH_EVERY.as_secs()
            );
            None
        }
    };
    let mut deleted = HashSet::new();
    let settle = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(settle);
    let mut settling = false;

    // systemd's watchdog (WatchdogSec=): pinged from this loop, so a
    // stuck loop gets the service restarted.
    let watchdog = sd_notify::watchdog_enabled();
    let mut watchdog_tick = tokio::time::interval(watchdog.map_or(Duration::from_secs(3600), |d| d / 2));
    if let Some(d) = watchdog {
        info!("systemd watchdog every {} ms", d.as_millis());
    }
    // Programs are attached, handlers installed, the endpoint serves.
    notify(&[NotifyState::Ready, NotifyState::Status("attached and serving")]);

    let mut current = config.clone();
    loop {
        tokio::select! {
            _ = signals.int.recv() => { info!("SIGINT: shutting down"); break; }
            _ = signals.term.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = signals.hup.recv() => {
                let mut reloading = vec![NotifyState::Reloading];
                reloading.extend(NotifyState::monotonic_usec_now().ok());
                notify(&reloading);
                let outcome = reload(args, source, &current, &*datapath);
                match outcome {
                    Ok(new) => {
                        stats.reload(true);
                        current = new;
                        if let Err(err) = detector.reload_names(maps) {
                            warn!("re-reading rule names after the reload: {err:#}");
                        }
                        notify(&[NotifyState::Ready, NotifyState::Status("reloaded")]);
                    }
                    Err(err) => {
                        stats.reload(false);
                        error!("reload rejected, the previous configuration stays in force: {err:#}");
                        notify(&[NotifyState::Ready, NotifyState::Status("reload rejected, previous configuration in force")]);
                    }
                }
            }
            _ = watchdog_tick.tick(), if watchdog.is_some() => {
                notify(&[NotifyState::Watchdog]);
            }
            guard = events.readable_mut() => {
                let mut guard = guard?;
                let ring = guard.get_inner_mut();
                let mut batch = Vec::new();
                while let Some(item) = ring.next() {
                    batch.extend(parse_event(&item));
                }
                guard.clear_ready();
                let now = crate::clock::boot_nanos();
                for event in &batch {
                    let delay = now.saturating_sub(event.flagged_ns) as f64 / 1e9;
                    stats.flag_delay(delay);
                    if let Err(err) = detector.on_event(event) {
                        stats.incident_error();
                        error!("recording an incident failed (the kernel keeps counting; retried on refresh): {err:#}");
                    }
                }
            }
            _ = judge.tick() => {
                match contacts.judge(maps, &current.policy) {
                    Ok(flags) => {
                        for flag in &flags {
                            if let Err(err) = detector.on_contact_flag(flag) {
                                stats.incident_error();
                                error!("recording an incident failed: {err:#}");
                            }
                        }
                        stats.contacts_judged(contacts.answered, contacts.failed);
                    }
                    Err(err) => warn!("judging first contacts: {err:#}"),
                }
            }
            _ = refresh.tick() => {
                if let Err(err) = detector.refresh() {
                    stats.incident_error();
                    error!("updating open incidents failed: {err:#}");
                }
                // Command-line list entries whose --ttl has passed: out of
                // the maps, so they neither linger nor count against the cap.
                if let Err(err) = install::change_lists(maps, install::CliChange::Expire) {
                    warn!("removing expired list entries: {err:#}");
                }
                if let Err(err) = sources::sweep_auto_blocks(maps) {
                    warn!("sweeping expired auto-blocks: {err:#}");
                }
                follow_links(datapath, &mut deleted);
            }
            notified = async { links.as_mut().expect("guarded").next().await }, if links.is_some() => {
                match notified {
                    Ok(events) => {
                        for event in events {
                            debug!("link notification: {event:?}");
                            if let LinkEvent::Deleted { ifindex, .. } = event {
                                deleted.insert(ifindex);
                            }
                        }
                        if !settling {
                            settle.as_mut().reset(tokio::time::Instant::now() + LINK_SETTLE);
                            settling = true;
                        }
                    }
                    Err(err) => {
                        warn!(
                            "link notifications stopped, interface changes are followed every {} s only: {err:#}",
                            REFRESH_EVERY.as_secs()
                        );
                        links = None;
                    }
                }
            }
            _ = &mut settle, if settling => {
                settling = false;
                follow_links(datapath, &mut deleted);
            }
            _ = count.tick(), if counting.is_none() => {
                let maps = maps.clone();
                let followed = detector.followed_keys();
                counting = Some(tokio::task::spawn_blocking(move || {
                    sources::census(&maps, &followed, MAX_RECOVERED_PER_WALK)
                }));
            }
            done = async { counting.as_mut().expect("guarded").await }, if counting.is_some() => {
                counting = None;
                match done {
                    Ok(Ok(census)) => {
                        stats.sources_counted(census.tracked, census.created);
                        // Flags whose events were lost: recorded now.
                        match detector.recover(&census.flagged) {
                            Ok(0) => {}
                            Ok(n) => info!(
                                "{n} flagged sources without an incident (their events were lost) go to the incident writer{}",
                                if census.more_flagged > 0 {
                                    format!(" ({} more flagged records left for the next walks)", census.more_flagged)
                                } else {
                                    String::new()
                                }
                            ),
                            Err(err) => {
                                stats.incident_error();
                                error!("recording recovered incidents failed: {err:#}");
                            }
                        }
                    }
                    Ok(Err(err)) => warn!("walking the per-source map: {err:#}"),
                    Err(err) => warn!("walking the per-source map: {err}"),
                }
            }
        }
    }
    server.abort();
    Ok(current)
}

/// Re-attaches, marks and logs interfaces that changed (see
/// [`Datapath::follow_links`]); `deleted` is consumed.
fn follow_links(datapath: &mut Datapath, deleted: &mut HashSet<u32>) {
    if let Err(err) = datapath.follow_links(deleted) {
        warn!("following interface changes: {err:#}");
    }
    deleted.clear();
}

/// Re-reads the config file and applies rules, lists and mode. Interface
/// and address changes need a restart and are reported, not applied.
fn reload(args: &RunArgs, source: &ConfigSource, current: &RunConfig, datapath: &Datapath) -> Result<RunConfig> {
    if !source.explicit && !source.path.exists() {
        bail!(
            "SIGHUP: no config file to reload ({} does not exist)",
            source.path.display()
        );
    }
    let new = load_config(args, source)?;
    if new.interfaces != current.interfaces || new.egress != current.egress {
        warn!("reload: interface changes take effect on the next restart");
    }
    if new.metrics_addr != current.metrics_addr || new.pin_dir != current.pin_dir || new.tc_attach != current.tc_attach
    {
        warn!("reload: metrics_addr, pin_dir and tc_attach changes take effect on the next restart");
    }
    if new.fleet != current.fleet {
        warn!("reload: [fleet] changes take effect on the next restart");
    }
    if new.keep_attached != current.keep_attached {
        info!("reload: keep_attached is now {}", new.keep_attached);
    }
    datapath
        .apply(&new.policy)
        .context("writing the new policy into the maps")?;
    info!(
        "reloaded: mode {}, {} rules, {} allowlist and {} blocklist entries",
        new.policy.mode.label(),
        new.policy.rules.len(),
        new.policy.allowlist.len(),
        new.policy.blocklist.len()
    );
    Ok(RunConfig {
        fleet: current.fleet.clone(),
        interfaces: current.interfaces.clone(),
        egress: current.egress.clone(),
        tc_attach: current.tc_attach,
        ..new
    })
}
