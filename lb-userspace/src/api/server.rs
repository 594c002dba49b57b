//! The control socket: one JSON request line in, one JSON response line out. Each change
//! is made under the state lock without waiting on anything, then saved to the
//! configuration file outside the lock, then acknowledged (see `Agent::change`).

use std::{os::unix::fs::PermissionsExt as _, path::Path, sync::Arc, time::Duration};

use anyhow::{Context as _, Result, bail};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};

use super::{
    Agent, RESOLVE_WAIT,
    protocol::{self, Request, Response},
    views,
};
use crate::{
    config::{BackendConfig, Config},
    health::CheckSpec,
    model::{Persist, RateLimit, Service},
};

/// Flow counts in `lb stats` may be this old (`--watch` asks every second); lists and
/// drain answers walk the table afresh.
pub const FLOW_SCAN_MAX_AGE: Duration = Duration::from_secs(5);

/// Binds the control socket root-only. A socket file left by a crashed agent is replaced;
/// one that answers belongs to a running agent and is an error.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "an agent is already running on {}: stop it first, or give this one another --socket",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Answers one connection.
pub async fn serve(stream: UnixStream, agent: Arc<Agent>) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    BufReader::new(read.take(protocol::MAX_REQUEST_BYTES as u64 + 1))
        .read_until(b'\n', &mut line)
        .await?;
    let response = match protocol::decode_request(&line) {
        Ok(request) => match handle(&agent, request).await {
            Ok(r) => r,
            Err(e) => Response::Error {
                error: format!("{e:#}"),
            },
        },
        Err(error) => Response::Error { error },
    };
    let mut out = serde_json::to_vec(&response)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    Ok(())
}

/// Does what `request` asks.
pub async fn handle(agent: &Agent, request: Request) -> Result<Response> {
    // Changes that need nothing but the lock: made under it, saved after it.
    macro_rules! change {
        ($state:ident => $body:expr) => {
            agent.change(true, |$state| Ok($body)).await?
        };
    }
    Ok(match request {
        Request::VipAdd(spec) => {
            let service = Service::new(spec.vip, spec.proto)?;
            let check = spec.check.apply(&CheckSpec::default())?;
            let rate = spec.rate().apply(&RateLimit::default());
            let persist = spec.persist(Persist::default())?;
            let algo = spec.algo.unwrap_or_default();
            let mode = spec.mode.unwrap_or_default();
            change!(s => {
                s.add_vip(service, algo, check, rate)?;
                s.set_persist(&service, persist)?;
                s.set_mode(&service, mode)?
            });
            Response::message(format!("added VIP {service}"))
        }
        Request::VipSet(spec) => {
            let service = Service {
                addr: spec.vip,
                proto: spec.proto,
            };
            change!(s => {
                let persist = spec.persist(s.vip(&service)?.persist)?;
                s.set_vip(&service, spec.algo, &spec.check, &spec.rate())?;
                s.set_persist(&service, persist)?;
                if let Some(mode) = spec.mode {
                    s.set_mode(&service, mode)?
                }
            });
            Response::message(format!("updated VIP {service}"))
        }
        Request::VipDel { vip, proto } => {
            let service = Service { addr: vip, proto };
            change!(s => s.del_vip(&service)?);
            Response::message(format!("removed VIP {service}"))
        }
        Request::BackendAdd(spec) => {
            let (service, backend) = (spec.service(), spec.backend);
            let config = {
                let state = agent.state.lock().await;
                let vip_check = &state.vip(&service)?.check;
                let config = BackendConfig {
                    weight: spec.weight.unwrap_or(1),
                    backup: spec.backup.unwrap_or(false),
                    check: if spec.check.is_empty() {
                        None
                    } else {
                        Some(spec.check.apply(vip_check)?)
                    },
                    ..BackendConfig::new(backend)
                };
                // Refused at once, before waiting on the kernel.
                state.check_new_backend(&service, &config)?;
                config
            };
            let reach = agent.reach(&[backend], RESOLVE_WAIT).await?;
            let reach = reach.get(&backend).cloned().unwrap_or_default();
            let note = reach.note.clone();
            change!(s => s.add_backend(&service, &config, reach)?);
            Response::message(match note {
                None => format!("added backend {backend} to VIP {service}"),
                Some(n) => format!(
                    "added backend {backend} to VIP {service}; no traffic until resolved: {n}"
                ),
            })
        }
        Request::BackendSet(spec) => {
            let (service, backend) = (spec.service(), spec.backend);
            change!(s => s.set_backend(&service, backend, spec.weight, spec.backup, &spec.check)?);
            Response::message(format!("updated backend {backend} of VIP {service}"))
        }
        Request::BackendDrain {
            vip,
            proto,
            backend,
            drain,
        } => {
            let service = Service { addr: vip, proto };
            let id = change!(s => {
                s.drain_backend(&service, backend, drain)?;
                let b = s.backend(&service, backend)?;
                (b.id, b.generation)
            });
            if drain {
                let flows = agent.flows.fresh(Duration::ZERO).await?.backend(id.0, id.1);
                Response::message(format!(
                    "draining backend {backend} of VIP {service}: {flows} flows remain"
                ))
            } else {
                Response::message(format!(
                    "backend {backend} of VIP {service} takes new flows again"
                ))
            }
        }
        Request::BackendDel {
            vip,
            proto,
            backend,
            grace_s: _,
            now: true,
        } => {
            let service = Service { addr: vip, proto };
            change!(s => s.del_backend(&service, backend)?);
            Response::message(format!("removed backend {backend} from VIP {service}"))
        }
        Request::BackendDel {
            vip,
            proto,
            backend,
            grace_s,
            now: false,
        } => {
            let service = Service { addr: vip, proto };
            let grace = grace_s.unwrap_or(protocol::DEFAULT_GRACE.as_secs());
            let until = crate::model::unix_now() as u64 + grace;
            let id = change!(s => {
                s.leave_backend(&service, backend, until)?;
                let b = s.backend(&service, backend)?;
                (b.id, b.generation)
            });
            // One without flows goes at once.
            if let Err(e) = agent.remove_departed(Duration::ZERO).await {
                log::warn!("removing leaving backends: {e:#}");
            }
            let still = agent.state.lock().await.backend(&service, backend).is_ok();
            if still {
                let flows = agent.flows.latest().map_or(0, |f| f.backend(id.0, id.1));
                Response::message(format!(
                    "backend {backend} of VIP {service} is leaving: no new flows; removed when \
                     its {flows} flows end, at the latest in {grace} s"
                ))
            } else {
                Response::message(format!(
                    "removed backend {backend} from VIP {service} (it had no flows)"
                ))
            }
        }
        Request::FirewallAdd { cidr } => {
            change!(s => s.add_rule(cidr)?);
            Response::message(format!("dropping packets from {cidr}"))
        }
        Request::FirewallDel { cidr } => {
            change!(s => s.del_rule(cidr)?);
            Response::message(format!("no longer dropping packets from {cidr}"))
        }
        Request::Apply {
            file,
            text,
            dry_run,
        } => {
            let config = Config::parse(&text).map_err(|e| anyhow::anyhow!("{file}: {e:#}"))?;
            let plan = agent.apply(&config, dry_run, true).await?;
            let what = if dry_run { "would change" } else { "applied" };
            Response::Ok {
                message: Some(format!("{file}: {what}: {}", plan.summary())),
                data: serde_json::to_value(&plan)?,
            }
        }
        Request::VipList => {
            let list = {
                let state = agent.state.lock().await;
                views::vips(&state, &state.counters()?)
            };
            Response::data(serde_json::to_value(list)?)
        }
        Request::BackendList { vip, proto } => {
            let filter = vip.map(|addr| Service { addr, proto });
            if let Some(f) = &filter {
                agent.state.lock().await.vip(f)?;
            }
            let flows = agent.flows.fresh(Duration::ZERO).await?;
            let list = {
                let state = agent.state.lock().await;
                views::backends(&state, filter.as_ref(), &state.counters()?, Some(&flows))
            };
            Response::data(serde_json::to_value(list)?)
        }
        Request::Stats => {
            let flows = agent.flows.fresh(FLOW_SCAN_MAX_AGE).await;
            if let Err(e) = &flows {
                log::warn!("walking the flow table: {e:#}");
            }
            let stats = {
                let state = agent.state.lock().await;
                views::stats(&state, &state.counters()?, flows.ok().as_deref())
            };
            Response::data(serde_json::to_value(stats)?)
        }
        Request::Status => {
            // Walked afresh, as for `lb backend list`: the overview is read once, and
            // should count the flows of the connections just made.
            let flows = agent.flows.fresh(Duration::ZERO).await;
            if let Err(e) = &flows {
                log::warn!("walking the flow table: {e:#}");
            }
            let snapshot = crate::monitor::status::snapshot(&*agent.state.lock().await)?;
            let drops = agent.history().reasons_over(views::DROP_WINDOW_SECONDS);
            let mut status = views::status(
                &agent.info,
                &snapshot,
                flows.ok().as_deref(),
                drops.as_ref(),
                crate::model::unix_now(),
            );
            status.fleet = views::Fleet::of(&agent.fleet.view());
            Response::data(serde_json::to_value(status)?)
        }
        Request::FleetStatus => Response::data(serde_json::to_value(agent.fleet.view())?),
        Request::FleetLeave | Request::FleetJoin => {
            let join = request == Request::FleetJoin;
            let changed = agent.fleet.set_member(join)?;
            if changed {
                agent.save_fleet().await?;
            }
            let view = agent.fleet.view();
            let message = match (join, changed) {
                (true, true) => {
                    "joined the fleet: announcing the VIP addresses this balancer can serve"
                }
                (true, false) => "already in the fleet",
                (false, true) => {
                    "left the fleet: every VIP address withdrawn; still forwarding what arrives"
                }
                (false, false) => "already left the fleet; still forwarding what arrives",
            };
            Response::Ok {
                message: Some(message.to_string()),
                data: serde_json::to_value(view)?,
            }
        }
        Request::FirewallList => {
            let list = {
                let state = agent.state.lock().await;
                views::rules(&state, &state.counters()?)
            };
            Response::data(serde_json::to_value(list)?)
        }
    })
}
