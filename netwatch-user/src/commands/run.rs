//! `netwatch run`: attach, serve metrics, reload on SIGHUP, detach on exit.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::maps::RingBuf;
use netwatch_common::maps;
use tokio::io::{Interest, unix::AsyncFd};

use anyhow::{Context as _, Result, bail};
use log::{error, info, warn};
use netwatch_common::{Direction, LinkKind};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cli::RunArgs,
    config::{ConfigFile, Overrides, RunConfig},
    datapath::{self, Attachments, PinnedMaps},
    detector::{Detector, MAX_RECOVERED_PER_WALK, parse_event},
    http::{self, AppState},
    install,
    metrics::ControllerStats,
    policy::Role,
    sources,
};

fn overrides(args: &RunArgs) -> Overrides {
    Overrides {
        mode: args.mode,
        metrics_addr: args.metrics_addr,
        pin_dir: args.pin_dir.clone(),
        state_dir: args.state_dir.clone(),
        interfaces: args.interfaces.clone(),
        egress: args.egress.clone(),
        rules: args.rules.clone(),
        allowlist: args.allowlist.clone(),
        blocklist: args.blocklist.clone(),
        tc_attach: args.tc_attach,
    }
}

/// Reads the config file (if any) and merges the flags over it.
fn load_config(args: &RunArgs) -> Result<RunConfig> {
    let file = args.config.as_deref().map(ConfigFile::load).transpose()?;
    RunConfig::build(file.as_ref(), &overrides(args))
}

pub fn run(args: RunArgs) -> Result<()> {
    let config = load_config(&args)?;
    if config.interfaces.is_empty() && config.egress.is_empty() {
        bail!(
            "no interface to attach to: give --iface IFACE[:wan|lan|host] or --egress IFACE (or `interfaces`/`egress` in the config file)"
        );
    }
    // Check every interface before attaching anything.
    for name in config.interfaces.iter().map(|i| &i.name).chain(&config.egress) {
        datapath::ifindex(name)?;
        datapath::link_kind(name)?;
    }
    // Before loading anything: a kernel without what the programs use is
    // refused with the missing feature's name, not a verifier dump.
    crate::features::check()?;
    for name in &config.egress {
        crate::tc::resolve(config.tc_attach, crate::tc::tcx_supported(name)?, name)?;
    }

    let listener = http::bind(config.metrics_addr)?;
    datapath::prepare_pin_dir(&config.pin_dir)?;
    let _lock = datapath::lock_pin_dir(&config.pin_dir)?;
    // Loading an instance creates (or re-opens) the pinned maps.
    drop(datapath::load_instance(
        &config.pin_dir,
        0,
        Direction::Inbound,
        LinkKind::Ethernet,
    )?);
    let maps = PinnedMaps::open(&config.pin_dir)?;
    install::apply_policy(&maps, &config.policy)?;
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

    let mut attachments = Attachments::new(&config.pin_dir);
    if let Err(err) = attach_all(&config, &maps, &mut attachments, args.xdp_generic) {
        attachments.detach();
        let _ = datapath::mark_all_detached(&maps);
        return Err(err);
    }

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let result = runtime.block_on(serve_until_signal(&args, &config, &maps, listener));

    if args.keep_attached {
        info!("leaving programs attached (--keep-attached); `netwatch detach` removes them");
        std::mem::forget(attachments);
    } else {
        attachments.detach();
        datapath::mark_all_detached(&maps)?;
        info!("detached; counters stay pinned in {}", config.pin_dir.display());
    }
    result
}

fn attach_all(config: &RunConfig, maps: &PinnedMaps, attachments: &mut Attachments, xdp_generic: bool) -> Result<()> {
    for iface in &config.interfaces {
        let index = datapath::ifindex(&iface.name)?;
        let slot = datapath::claim_iface_slot(maps, &iface.name, iface.role, index)?;
        let mode = attachments.attach_xdp(&iface.name, slot, iface.role.xdp_direction(), xdp_generic)?;
        let tc = if config.egress.contains(&iface.name) {
            Some(attachments.attach_tc_egress(&iface.name, slot, config.tc_attach)?)
        } else {
            None
        };
        datapath::mark_attached(maps, slot, Some(mode), tc)?;
        info!(
            "{}: role {}, XDP {}{}",
            iface.name,
            iface.role.label(),
            match mode {
                Some(datapath::XdpAttachMode::Native) => "native",
                Some(datapath::XdpAttachMode::Generic) => "generic",
                None => "re-adopted",
            },
            tc.map(|path| format!(", TC egress ({path})")).unwrap_or_default()
        );
    }
    for name in config
        .egress
        .iter()
        .filter(|e| !config.interfaces.iter().any(|i| &i.name == *e))
    {
        let slot = datapath::claim_iface_slot(maps, name, Role::Host, datapath::ifindex(name)?)?;
        let path = attachments.attach_tc_egress(name, slot, config.tc_attach)?;
        datapath::mark_attached(maps, slot, None, Some(path))?;
        info!("{name}: TC egress ({path})");
    }
    Ok(())
}

/// How often open incidents are brought up to date from the kernel (and
/// expired auto-blocks swept).
const REFRESH_EVERY: Duration = Duration::from_secs(5);
/// How often the per-source map is walked: the tracked sources counted
/// (never at scrape time), flags whose events were lost recorded.
const COUNT_EVERY: Duration = Duration::from_secs(30);

async fn serve_until_signal(
    args: &RunArgs,
    config: &RunConfig,
    maps: &PinnedMaps,
    listener: std::net::TcpListener,
) -> Result<()> {
    let mut detector = Detector::open(maps, &config.state_dir)?;
    let stats = Arc::new(Mutex::new(ControllerStats::default()));
    let state = AppState {
        pin_dir: config.pin_dir.clone(),
        state_dir: config.state_dir.clone(),
        stats: stats.clone(),
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
    let mut count = tokio::time::interval(COUNT_EVERY);
    let mut counting: Option<tokio::task::JoinHandle<Result<sources::Census>>> = None;

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut current = config.clone();
    loop {
        tokio::select! {
            _ = sigint.recv() => { info!("SIGINT: shutting down"); break; }
            _ = sigterm.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = sighup.recv() => {
                let outcome = reload(args, &current, maps);
                let mut s = stats.lock().expect("stats lock");
                match outcome {
                    Ok(new) => {
                        s.reloads_ok += 1;
                        s.last_reload_ok = true;
                        current = new;
                        if let Err(err) = detector.reload_names(maps) {
                            warn!("re-reading rule names after the reload: {err:#}");
                        }
                    }
                    Err(err) => {
                        s.reloads_failed += 1;
                        s.last_reload_ok = false;
                        error!("reload rejected, the previous configuration stays in force: {err:#}");
                    }
                }
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
                    stats.lock().expect("stats lock").flag_delay.observe(delay);
                    if let Err(err) = detector.on_event(event) {
                        stats.lock().expect("stats lock").incident_errors += 1;
                        error!("recording an incident failed (the kernel keeps counting; retried on refresh): {err:#}");
                    }
                }
            }
            _ = refresh.tick() => {
                if let Err(err) = detector.refresh() {
                    stats.lock().expect("stats lock").incident_errors += 1;
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
                if let Err(err) = datapath::check_interfaces(maps) {
                    warn!("checking interfaces: {err:#}");
                }
            }
            _ = count.tick(), if counting.is_none() => {
                let pin_dir = config.pin_dir.clone();
                let followed = detector.followed_keys();
                counting = Some(tokio::task::spawn_blocking(move || {
                    sources::census(&PinnedMaps::open(&pin_dir)?, &followed, MAX_RECOVERED_PER_WALK)
                }));
            }
            done = async { counting.as_mut().expect("guarded").await }, if counting.is_some() => {
                counting = None;
                match done {
                    Ok(Ok(census)) => {
                        stats.lock().expect("stats lock").sources_tracked = Some(census.tracked);
                        // Flags whose events were lost: recorded now.
                        match detector.recover(&census.flagged) {
                            Ok(0) => {}
                            Ok(n) => info!(
                                "recorded {n} flagged sources whose events were lost as recovered incidents{}",
                                if census.more_flagged > 0 {
                                    format!(" ({} more flagged records left for the next walks)", census.more_flagged)
                                } else {
                                    String::new()
                                }
                            ),
                            Err(err) => {
                                stats.lock().expect("stats lock").incident_errors += 1;
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
    Ok(())
}

/// Re-reads the config file and applies rules, lists and mode. Interface
/// and address changes need a restart and are reported, not applied.
fn reload(args: &RunArgs, current: &RunConfig, maps: &PinnedMaps) -> Result<RunConfig> {
    if args.config.is_none() {
        bail!("SIGHUP: no --config file to reload");
    }
    let new = load_config(args)?;
    if new.interfaces != current.interfaces || new.egress != current.egress {
        warn!("reload: interface changes take effect on the next restart");
    }
    if new.metrics_addr != current.metrics_addr || new.pin_dir != current.pin_dir || new.tc_attach != current.tc_attach
    {
        warn!("reload: metrics_addr, pin_dir and tc_attach changes take effect on the next restart");
    }
    install::apply_policy(maps, &new.policy).context("writing the new policy into the maps")?;
    info!(
        "reloaded: mode {}, {} rules, {} allowlist and {} blocklist entries",
        new.policy.mode.label(),
        new.policy.rules.len(),
        new.policy.allowlist.len(),
        new.policy.blocklist.len()
    );
    Ok(RunConfig {
        interfaces: current.interfaces.clone(),
        egress: current.egress.clone(),
        tc_attach: current.tc_attach,
        ..new
    })
}
