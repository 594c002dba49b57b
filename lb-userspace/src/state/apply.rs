//! A whole configuration applied as one change (`lb run` at start, `lb apply`, SIGHUP):
//! the difference between it and the running state, applied so that what did not change
//! is not touched (an unchanged backend keeps its id, flows and health).

use std::{collections::HashMap, fmt, net::IpAddr};

use anyhow::{Result, bail};
use ipnet::IpNet;
use lb_common::{MAX_BACKENDS, MAX_FIREWALL_RULES, MAX_VIPS};
use serde::{Deserialize, Serialize};

use super::{Dataplane, State};
use crate::{
    config::Config,
    model::{Reach, Service},
};

/// One difference between a configuration and the running state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    AddRule { cidr: IpNet },
    DelRule { cidr: IpNet },
    AddVip { vip: Service },
    SetVip { vip: Service },
    DelVip { vip: Service },
    AddBackend { vip: Service, backend: IpAddr },
    SetBackend { vip: Service, backend: IpAddr },
    DelBackend { vip: Service, backend: IpAddr },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::AddRule { cidr } => write!(f, "+ drop {cidr}"),
            Change::DelRule { cidr } => write!(f, "- drop {cidr}"),
            Change::AddVip { vip } => write!(f, "+ vip {vip}"),
            Change::SetVip { vip } => write!(f, "~ vip {vip}"),
            Change::DelVip { vip } => write!(f, "- vip {vip}"),
            Change::AddBackend { vip, backend } => write!(f, "+ backend {backend} of {vip}"),
            Change::SetBackend { vip, backend } => write!(f, "~ backend {backend} of {vip}"),
            Change::DelBackend { vip, backend } => write!(f, "- backend {backend} of {vip}"),
        }
    }
}

/// Every difference, in the order they are applied.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub changes: Vec<Change>,
}

impl Plan {
    /// `3 added, 1 changed, 2 removed`.
    pub fn summary(&self) -> String {
        let count = |c: char| {
            self.changes
                .iter()
                .filter(|x| x.to_string().starts_with(c))
                .count()
        };
        format!(
            "{} added, {} changed, {} removed",
            count('+'),
            count('~'),
            count('-')
        )
    }
}

impl<D: Dataplane> State<D> {
    /// What applying `config` would change.
    pub fn plan(&self, config: &Config) -> Result<Plan> {
        let mut changes = Vec::new();
        let wanted_rules = &config.firewall.drop;
        for (net, _) in &self.rules {
            if !wanted_rules.contains(net) {
                changes.push(Change::DelRule { cidr: *net });
            }
        }
        let mut wanted = HashMap::new();
        for vc in &config.vips {
            wanted.insert(Service::new(vc.address, vc.proto)?, vc);
        }
        for v in &self.vips {
            if !wanted.contains_key(&v.service) {
                changes.push(Change::DelVip { vip: v.service });
            }
        }
        for v in &self.vips {
            let Some(vc) = wanted.get(&v.service) else {
                continue;
            };
            for b in &v.backends {
                if !vc.backends.iter().any(|bc| bc.address == b.addr) {
                    changes.push(Change::DelBackend {
                        vip: v.service,
                        backend: b.addr,
                    });
                }
            }
        }
        for net in wanted_rules {
            if !self.rules.iter().any(|(n, _)| n == net) {
                changes.push(Change::AddRule { cidr: *net });
            }
        }
        for vc in &config.vips {
            let service = Service::new(vc.address, vc.proto)?;
            let running = self.vips.iter().find(|v| v.service == service);
            match running {
                None => changes.push(Change::AddVip { vip: service }),
                Some(v)
                    if v.algo != vc.algo
                        || v.mode != vc.mode
                        || v.check != vc.check
                        || v.rate != vc.rate()
                        || v.persist != vc.persist() =>
                {
                    changes.push(Change::SetVip { vip: service })
                }
                Some(_) => {}
            }
            for bc in &vc.backends {
                let b = running.and_then(|v| v.backends.iter().find(|b| b.addr == bc.address));
                match b {
                    None => changes.push(Change::AddBackend {
                        vip: service,
                        backend: bc.address,
                    }),
                    Some(b) if b.config() != *bc => changes.push(Change::SetBackend {
                        vip: service,
                        backend: bc.address,
                    }),
                    Some(_) => {}
                }
            }
        }
        Ok(Plan { changes })
    }

    /// Makes the running state what `config` says (already validated, see
    /// `Config::parse`), with `reach` for the backends it adds. Nothing is changed when the
    /// tables cannot hold the result. Rings are built once per VIP touched, at the end.
    pub fn apply(&mut self, config: &Config, reach: &HashMap<IpAddr, Reach>) -> Result<Plan> {
        let plan = self.plan(config)?;
        let count = |f: &dyn Fn(&Change) -> bool| plan.changes.iter().filter(|c| f(c)).count();
        // Adopted entries have their ids reserved already (`prepare_adoption`).
        let new_vips = count(&|c| matches!(c, Change::AddVip { vip } if !self.adopted_vip(vip)));
        let new_backends = count(
            &|c| matches!(c, Change::AddBackend { vip, backend } if !self.adopted_backend(vip, *backend)),
        );
        let new_rules =
            count(&|c| matches!(c, Change::AddRule { cidr } if !self.adopted_rule(cidr)));
        // Removed ids are quarantined before reuse: only ids free now count.
        if new_vips > self.vip_ids.available() {
            bail!(
                "too many VIPs: {new_vips} new, room for {} (of {MAX_VIPS})",
                self.vip_ids.available()
            );
        }
        if new_backends > self.backend_ids.available() {
            bail!(
                "too many backends: {new_backends} new, room for {} (of {MAX_BACKENDS})",
                self.backend_ids.available()
            );
        }
        if new_rules > self.rule_ids.available() {
            bail!(
                "too many drop rules: {new_rules} new, room for {} (of {MAX_FIREWALL_RULES})",
                self.rule_ids.available()
            );
        }
        let vip_config = |s: &Service| {
            config
                .vips
                .iter()
                .find(|vc| vc.address == s.addr && vc.proto == s.proto)
                .expect("planned from this config")
        };
        let mut touched: Vec<Service> = Vec::new();
        let mut cleared = Vec::new();
        for change in &plan.changes {
            match change {
                Change::DelRule { cidr } => self.del_rule(*cidr)?,
                Change::DelVip { vip } => self.del_vip(vip)?,
                Change::DelBackend { vip, backend } => {
                    let (vi, bi) = self.backend_index(vip, *backend)?;
                    let b = self.vips[vi].backends.remove(bi);
                    self.version += 1;
                    cleared.push((b.id, b.generation));
                    touched.push(*vip);
                }
                Change::AddRule { cidr } => self.add_rule(*cidr)?,
                Change::AddVip { vip } => {
                    let vc = vip_config(vip);
                    let vi = self.insert_vip(*vip, vc.algo, vc.check.clone(), vc.rate())?;
                    self.vips[vi].persist = vc.persist();
                    self.vips[vi].mode = vc.mode;
                    touched.push(*vip);
                }
                Change::SetVip { vip } => {
                    let vc = vip_config(vip);
                    let vi = self.vip_index(vip)?;
                    self.update_vip(vi, vc.algo, vc.check.clone(), vc.rate())?;
                    self.vips[vi].persist = vc.persist();
                    self.set_mode(vip, vc.mode)?;
                    touched.push(*vip);
                }
                Change::AddBackend { vip, backend } => {
                    let vc = vip_config(vip);
                    let bc = vc.backends.iter().find(|b| b.address == *backend);
                    let bc = bc.expect("planned from this config");
                    let vi = self.vip_index(vip)?;
                    let r = reach.get(backend).cloned().unwrap_or_default();
                    self.insert_backend(vi, bc, r)?;
                    touched.push(*vip);
                }
                Change::SetBackend { vip, backend } => {
                    let vc = vip_config(vip);
                    let bc = vc.backends.iter().find(|b| b.address == *backend);
                    let bc = bc.expect("planned from this config");
                    let (vi, bi) = self.backend_index(vip, *backend)?;
                    self.update_backend(vi, bi, bc)?;
                    touched.push(*vip);
                }
            }
        }
        touched.sort();
        touched.dedup();
        for service in &touched {
            let vi = self.vip_index(service)?;
            self.rebuild_ring(vi)?;
        }
        // Out of the rings first, then out of use: their flows are re-balanced.
        for (id, generation) in cleared {
            self.clear_backend(id, generation)?;
        }
        Ok(plan)
    }
}
