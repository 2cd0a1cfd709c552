//! Which MPCs exist and whether they are live: the maps by name and by uuid behind DELETE
//! and GET, and how the configured [`Liveness`] treats a name never seen before.

use std::collections::HashMap;

use uuid::Uuid;

use super::Liveness;

pub(super) enum NameState {
    Live(Uuid),
    /// Ended; `None` for a name that was ended in `AllNames` mode without ever getting a uuid.
    Ended(Option<Uuid>),
}

pub(super) struct MpcRecord {
    name: String,
    live: bool,
}

/// A snapshot of one MPC, for the GET answer.
pub(super) struct MpcInfo {
    pub(super) name: String,
    pub(super) uuid: Uuid,
    pub(super) live: bool,
}

pub(super) struct Registry {
    pub(super) liveness: Liveness,
    pub(super) by_name: HashMap<String, NameState>,
    pub(super) by_uuid: HashMap<Uuid, MpcRecord>,
}

impl Registry {
    fn forget_ended(&self) -> bool {
        matches!(self.liveness, Liveness::AllNames { forget_ended: true })
    }

    pub(super) fn add(&mut self, name: &str) -> Uuid {
        if let Some(NameState::Live(uuid)) = self.by_name.get(name) {
            return *uuid;
        }
        let uuid = Uuid::new_v4();
        self.by_name.insert(name.to_owned(), NameState::Live(uuid));
        self.by_uuid.insert(
            uuid,
            MpcRecord {
                name: name.to_owned(),
                live: true,
            },
        );
        uuid
    }

    pub(super) fn is_live(&self, name: &str) -> bool {
        match self.by_name.get(name) {
            Some(NameState::Live(_)) => true,
            Some(NameState::Ended(_)) => false,
            None => matches!(self.liveness, Liveness::AllNames { .. }),
        }
    }

    /// Mark MPC `uuid` (named `name`) ended, or forget it in `forget_ended` mode.
    fn finish(&mut self, name: &str, uuid: Uuid) {
        if self.forget_ended() {
            self.by_uuid.remove(&uuid);
            if matches!(self.by_name.get(name), Some(NameState::Live(u)) if *u == uuid) {
                self.by_name.remove(name);
            }
            return;
        }
        if let Some(rec) = self.by_uuid.get_mut(&uuid) {
            rec.live = false;
        }
        if let Some(state) = self.by_name.get_mut(name) {
            if matches!(state, NameState::Live(u) if *u == uuid) {
                *state = NameState::Ended(Some(uuid));
            }
        }
    }

    pub(super) fn end_by_name(&mut self, name: &str) -> bool {
        match self.by_name.get(name) {
            Some(NameState::Live(uuid)) => {
                let uuid = *uuid;
                self.finish(name, uuid);
                true
            }
            Some(NameState::Ended(_)) => false,
            None => match self.liveness {
                Liveness::AllNames { forget_ended: true } => true,
                Liveness::AllNames {
                    forget_ended: false,
                } => {
                    self.by_name.insert(name.to_owned(), NameState::Ended(None));
                    true
                }
                Liveness::Explicit => false,
            },
        }
    }

    pub(super) fn end_by_uuid(&mut self, uuid: Uuid) -> bool {
        let name = match self.by_uuid.get(&uuid) {
            Some(rec) if rec.live => rec.name.clone(),
            _ => return false,
        };
        self.finish(&name, uuid);
        true
    }

    pub(super) fn describe_uuid(&self, uuid: Uuid) -> Option<MpcInfo> {
        self.by_uuid.get(&uuid).map(|rec| MpcInfo {
            name: rec.name.clone(),
            uuid,
            live: rec.live,
        })
    }

    pub(super) fn describe_name(&mut self, name: &str) -> Option<MpcInfo> {
        match self.by_name.get(name) {
            Some(NameState::Live(uuid)) => Some(MpcInfo {
                name: name.to_owned(),
                uuid: *uuid,
                live: true,
            }),
            Some(NameState::Ended(Some(uuid))) => Some(MpcInfo {
                name: name.to_owned(),
                uuid: *uuid,
                live: false,
            }),
            Some(NameState::Ended(None)) => {
                // Give the ended MPC a uuid now, so it can be described like any other.
                let uuid = Uuid::new_v4();
                self.by_name
                    .insert(name.to_owned(), NameState::Ended(Some(uuid)));
                self.by_uuid.insert(
                    uuid,
                    MpcRecord {
                        name: name.to_owned(),
                        live: false,
                    },
                );
                Some(MpcInfo {
                    name: name.to_owned(),
                    uuid,
                    live: false,
                })
            }
            None => match self.liveness {
                Liveness::AllNames { .. } => {
                    let uuid = self.add(name);
                    Some(MpcInfo {
                        name: name.to_owned(),
                        uuid,
                        live: true,
                    })
                }
                Liveness::Explicit => None,
            },
        }
    }
}
