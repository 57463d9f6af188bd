//! The plan of a stack deploy: which applications and placements to create, which to update
//! (and which top-level fields change), and which are already as the stack file declares.
//!
//! [`plan`] is pure: it reads the parsed stack and the objects the server holds and returns the
//! changes, resolving every device and pool name and checking every rule it can know of before
//! anything is written, so a deploy that fails here writes nothing. Objects the stack does not
//! mention are never touched: an application without a `placement` keeps whatever placement it
//! has, and applications missing from the file are left alone.

use std::collections::BTreeMap;
use std::fmt;

use edgible::model::{
    Application, ApplicationId, ApplicationSpec, Device, DeviceId, DevicePool, DevicePoolId, Hostname, Name, Placement,
    PlacementId, PlacementSpec, PoolKind, Region, Revision,
};
use edgible::stack::{Stack, StackError, StackPlacement};
use serde::Serialize;

use crate::placements::describe_placement;

/// What the server holds, read before planning.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    pub applications: Vec<Application>,
    pub placements: Vec<Placement>,
    pub devices: Vec<Device>,
    pub pools: Vec<DevicePool>,
}

/// Where the stack wants an application to run, with names resolved to ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Device { id: DeviceId, name: Name },
    Cloud { pool: Option<(DevicePoolId, Name)>, region: Option<Region> },
}

impl Target {
    pub fn spec(&self, application_id: ApplicationId) -> PlacementSpec {
        match self {
            Target::Device { id, .. } => PlacementSpec::ServingDevice { application_id, device_id: *id },
            Target::Cloud { pool, region } => PlacementSpec::Cloud {
                application_id,
                pool_id: pool.as_ref().map(|(id, _)| *id),
                region: region.clone(),
            },
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Device { name, .. } => write!(f, "device {name}"),
            Target::Cloud { pool: Some((_, pool)), region: Some(region) } => {
                write!(f, "cloud pool {pool} in region {region}")
            }
            Target::Cloud { pool: Some((_, pool)), region: None } => write!(f, "cloud pool {pool}"),
            Target::Cloud { pool: None, region: Some(region) } => write!(f, "cloud region {region}"),
            Target::Cloud { pool: None, region: None } => f.write_str("cloud"),
        }
    }
}

/// One step of a deploy, in the order it is applied: each application's change comes before
/// its placement's, so a new application has an id by the time it is placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    CreateApplication {
        spec: ApplicationSpec,
    },
    UpdateApplication {
        id: ApplicationId,
        /// The revision read; the update is refused if the application changed since.
        revision: Revision,
        spec: ApplicationSpec,
        /// The top-level spec fields that differ.
        fields: Vec<String>,
    },
    KeepApplication {
        id: ApplicationId,
        name: Name,
    },
    CreatePlacement {
        application: Name,
        target: Target,
    },
    UpdatePlacement {
        id: PlacementId,
        revision: Revision,
        application: Name,
        /// Where it runs now.
        from: String,
        target: Target,
    },
    KeepPlacement {
        application: Name,
        target: Target,
    },
}

/// What a change does, in words and in `-o json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Create,
    Update,
    Unchanged,
}

/// A change as `stack diff -o json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChangeView {
    pub kind: &'static str,
    pub application: String,
    pub action: Action,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

impl Change {
    pub fn action(&self) -> Action {
        match self {
            Change::CreateApplication { .. } | Change::CreatePlacement { .. } => Action::Create,
            Change::UpdateApplication { .. } | Change::UpdatePlacement { .. } => Action::Update,
            Change::KeepApplication { .. } | Change::KeepPlacement { .. } => Action::Unchanged,
        }
    }

    pub fn is_write(&self) -> bool {
        self.action() != Action::Unchanged
    }

    fn application(&self) -> &Name {
        match self {
            Change::CreateApplication { spec } | Change::UpdateApplication { spec, .. } => &spec.name,
            Change::KeepApplication { name, .. } => name,
            Change::CreatePlacement { application, .. }
            | Change::UpdatePlacement { application, .. }
            | Change::KeepPlacement { application, .. } => application,
        }
    }

    fn subject(&self) -> String {
        match self {
            Change::CreateApplication { .. } | Change::UpdateApplication { .. } | Change::KeepApplication { .. } => {
                format!("application {}", self.application())
            }
            _ => format!("placement of {}", self.application()),
        }
    }

    /// What is being done, for progress: `creating application web`.
    pub fn doing(&self) -> String {
        let verb = match self.action() {
            Action::Create => "creating",
            Action::Update => "updating",
            Action::Unchanged => "keeping",
        };
        format!("{verb} {}", self.subject())
    }

    /// What was done, for progress: `created application web`.
    pub fn done(&self) -> String {
        let verb = match self.action() {
            Action::Create => "created",
            Action::Update => "updated",
            Action::Unchanged => "kept",
        };
        format!("{verb} {}", self.subject())
    }

    pub fn view(&self) -> ChangeView {
        let (kind, fields, from, target) = match self {
            Change::CreateApplication { .. } | Change::KeepApplication { .. } => ("application", vec![], None, None),
            Change::UpdateApplication { fields, .. } => ("application", fields.clone(), None, None),
            Change::CreatePlacement { target, .. } | Change::KeepPlacement { target, .. } => {
                ("placement", vec![], None, Some(target.to_string()))
            }
            Change::UpdatePlacement { from, target, .. } => {
                ("placement", vec![], Some(from.clone()), Some(target.to_string()))
            }
        };
        ChangeView { kind, application: self.application().to_string(), action: self.action(), fields, from, target }
    }
}

/// One line of the plan: `+ application web: create`.
impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let subject = self.subject();
        match self {
            Change::CreateApplication { .. } => write!(f, "+ {subject}: create"),
            Change::UpdateApplication { fields, .. } => write!(f, "~ {subject}: update {}", fields.join(", ")),
            Change::KeepApplication { .. } => write!(f, "= {subject}: unchanged"),
            Change::CreatePlacement { target, .. } => write!(f, "+ {subject}: create on {target}"),
            Change::UpdatePlacement { from, target, .. } => write!(f, "~ {subject}: update {from} -> {target}"),
            Change::KeepPlacement { target, .. } => write!(f, "= {subject}: unchanged on {target}"),
        }
    }
}

/// How many changes of each action a plan holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Summary {
    pub create: usize,
    pub update: usize,
    pub unchanged: usize,
}

impl Summary {
    pub fn of(changes: &[Change]) -> Self {
        let mut summary = Summary::default();
        for change in changes {
            match change.action() {
                Action::Create => summary.create += 1,
                Action::Update => summary.update += 1,
                Action::Unchanged => summary.unchanged += 1,
            }
        }
        summary
    }

    pub fn writes(&self) -> usize {
        self.create + self.update
    }
}

/// The changes that make the server hold what `stack` declares. `text` is the stack file the
/// stack was parsed from, so that errors point at its lines.
pub fn plan(stack: &Stack, text: &str, inventory: &Inventory) -> Result<Vec<Change>, StackError> {
    check_hostnames(stack, text, inventory)?;
    let targets = stack
        .applications
        .iter()
        .enumerate()
        .map(|(index, application)| {
            application
                .placement
                .as_ref()
                .map(|placement| resolve_target(placement, index, text, inventory))
                .transpose()
        })
        .collect::<Result<Vec<_>, _>>()?;

    let mut changes = Vec::new();
    for (desired, target) in stack.applications.iter().zip(targets) {
        let existing = inventory.applications.iter().find(|application| application.spec.name == desired.spec.name);
        match existing {
            None => changes.push(Change::CreateApplication { spec: desired.spec.clone() }),
            Some(existing) => {
                let spec = carry_server_values(desired.spec.clone(), &existing.spec);
                let fields = changed_fields(&existing.spec, &spec);
                changes.push(if fields.is_empty() {
                    Change::KeepApplication { id: existing.id, name: existing.spec.name.clone() }
                } else {
                    Change::UpdateApplication { id: existing.id, revision: existing.revision, spec, fields }
                });
            }
        }
        let Some(target) = target else { continue };
        let application = desired.spec.name.clone();
        let current = existing.and_then(|existing| {
            inventory.placements.iter().find(|placement| placement.spec.application_id() == existing.id)
        });
        changes.push(match current {
            None => Change::CreatePlacement { application, target },
            Some(current) if current.spec == target.spec(current.spec.application_id()) => {
                Change::KeepPlacement { application, target }
            }
            Some(current) => Change::UpdatePlacement {
                id: current.id,
                revision: current.revision,
                application,
                from: describe_placement(&current.spec, &inventory.devices, &inventory.pools),
                target,
            },
        });
    }
    Ok(changes)
}

/// A hostname may appear once in the stack, and not on an application the stack leaves alone
/// (the server would refuse it halfway through the deploy).
fn check_hostnames(stack: &Stack, text: &str, inventory: &Inventory) -> Result<(), StackError> {
    let mut declared: BTreeMap<&Hostname, &Name> = BTreeMap::new();
    for (index, application) in stack.applications.iter().enumerate() {
        for (position, hostname) in application.spec.hostnames.iter().enumerate() {
            let field = format!("applications[{index}].hostnames[{position}]");
            if let Some(other) = declared.insert(hostname, &application.spec.name) {
                return Err(StackError::at_field(
                    text,
                    field,
                    format!("hostname {hostname} is also declared by application {other}"),
                ));
            }
            let holder = inventory.applications.iter().find(|existing| {
                existing.spec.hostnames.contains(hostname)
                    && !stack.applications.iter().any(|desired| desired.spec.name == existing.spec.name)
            });
            if let Some(holder) = holder {
                return Err(StackError::at_field(
                    text,
                    field,
                    format!(
                        "hostname {hostname} belongs to application {}, which this stack does not declare",
                        holder.spec.name
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn resolve_target(
    placement: &StackPlacement,
    index: usize,
    text: &str,
    inventory: &Inventory,
) -> Result<Target, StackError> {
    let field = |name: &str| format!("applications[{index}].placement.{name}");
    match placement {
        StackPlacement::ServingDevice { device } => inventory
            .devices
            .iter()
            .find(|candidate| candidate.spec.name == *device)
            .map(|found| Target::Device { id: found.id, name: found.spec.name.clone() })
            .ok_or_else(|| StackError::at_field(text, field("device"), format!("there is no device named {device}"))),
        StackPlacement::Cloud { pool, region } => {
            let pool = match pool {
                None => None,
                Some(name) => {
                    let found =
                        inventory.pools.iter().find(|candidate| candidate.spec.name == *name).ok_or_else(|| {
                            StackError::at_field(text, field("pool"), format!("there is no device pool named {name}"))
                        })?;
                    if found.spec.kind != PoolKind::Cloud {
                        return Err(StackError::at_field(
                            text,
                            field("pool"),
                            format!("pool {name} holds devices, not cloud hosts; a cloud placement needs a cloud pool"),
                        ));
                    }
                    Some((found.id, found.spec.name.clone()))
                }
            };
            Ok(Target::Cloud { pool, region: region.clone() })
        }
    }
}

/// The desired spec with the values the server fills in when a spec leaves them out, taken
/// from the existing spec, so that they neither count as a change nor get regenerated by the
/// update: today, the generated short code of a `short_code` access policy.
fn carry_server_values(mut desired: ApplicationSpec, existing: &ApplicationSpec) -> ApplicationSpec {
    if let (Some(wanted), Some(current)) = (&mut desired.access.short_code, &existing.access.short_code)
        && wanted.code.is_none()
    {
        wanted.code = current.code.clone();
    }
    desired
}

/// The top-level fields of the spec that differ, in the order of their names.
fn changed_fields(existing: &ApplicationSpec, desired: &ApplicationSpec) -> Vec<String> {
    if existing == desired {
        return Vec::new();
    }
    let as_object = |spec: &ApplicationSpec| match serde_json::to_value(spec) {
        Ok(serde_json::Value::Object(object)) => object,
        _ => serde_json::Map::new(),
    };
    let (before, after) = (as_object(existing), as_object(desired));
    let mut fields: Vec<String> =
        before.keys().chain(after.keys()).filter(|key| before.get(*key) != after.get(*key)).cloned().collect();
    fields.sort();
    fields.dedup();
    if fields.is_empty() {
        // The specs differ in a way their JSON does not show; name the whole spec rather than
        // claim nothing changed.
        fields.push("spec".to_owned());
    }
    fields
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use edgible::model::{
        DevicePoolSpec, DeviceSpec, DeviceState, DeviceStatus, OrganizationId, PlacementSpec, ShortCodeAccess,
    };

    use super::*;

    const STACK: &str = "\
applications:
  - name: web
    hostnames: [web.example.test]
    port: 8080
    workload:
      process:
        command: /usr/bin/python3
        args: [-m, http.server, '8080']
    placement:
      strategy: serving-device
      device: dev1
  - name: api
    hostnames: [api.example.test]
    port: 9000
    workload:
      container:
        image: localhost/api:1
";

    fn device(name: &str) -> Device {
        let now = Utc::now();
        Device {
            id: DeviceId::new(),
            organization_id: OrganizationId::new(),
            revision: 1,
            created_at: now,
            updated_at: now,
            spec: DeviceSpec { name: name.parse().unwrap(), pool_id: DevicePoolId::new(), labels: BTreeMap::new() },
            status: DeviceStatus {
                tunnel_address: "100.96.0.1".parse().unwrap(),
                public_key: None,
                state: DeviceState::Pending,
                applied_revision: None,
                last_seen_at: None,
                cloud_host: None,
            },
        }
    }

    fn pool(name: &str, kind: PoolKind) -> DevicePool {
        let now = Utc::now();
        DevicePool {
            id: DevicePoolId::new(),
            organization_id: OrganizationId::new(),
            revision: 1,
            created_at: now,
            updated_at: now,
            spec: DevicePoolSpec {
                name: name.parse().unwrap(),
                tunnel_cidr: "100.96.0.0/16".parse().unwrap(),
                kind,
                region: Some("eu-west".parse().unwrap()),
            },
        }
    }

    fn application(spec: &ApplicationSpec, revision: Revision) -> Application {
        let now = Utc::now();
        Application {
            id: ApplicationId::new(),
            organization_id: OrganizationId::new(),
            revision,
            created_at: now,
            updated_at: now,
            spec: spec.clone(),
        }
    }

    fn placement(spec: PlacementSpec, revision: Revision) -> Placement {
        let now = Utc::now();
        Placement {
            id: PlacementId::new(),
            organization_id: OrganizationId::new(),
            revision,
            created_at: now,
            updated_at: now,
            host: spec.device_id(),
            migration_id: None,
            spec,
        }
    }

    /// The inventory after `STACK` was deployed on `devices`.
    fn deployed(stack: &Stack, devices: Vec<Device>) -> Inventory {
        let applications: Vec<Application> =
            stack.applications.iter().map(|desired| application(&desired.spec, 7)).collect();
        let web = &applications[0];
        let placements =
            vec![placement(PlacementSpec::ServingDevice { application_id: web.id, device_id: devices[0].id }, 8)];
        Inventory { applications, placements, devices, pools: vec![] }
    }

    fn lines(changes: &[Change]) -> Vec<String> {
        changes.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn an_empty_server_gets_everything_created() {
        let stack = Stack::parse(STACK).unwrap();
        let inventory = Inventory { devices: vec![device("dev1")], ..Inventory::default() };
        let changes = plan(&stack, STACK, &inventory).unwrap();
        assert_eq!(
            lines(&changes),
            ["+ application web: create", "+ placement of web: create on device dev1", "+ application api: create",]
        );
        assert_eq!(Summary::of(&changes), Summary { create: 3, update: 0, unchanged: 0 });
        let Change::CreatePlacement { target: Target::Device { id, .. }, .. } = &changes[1] else {
            panic!("{changes:?}")
        };
        assert_eq!(*id, inventory.devices[0].id);
    }

    #[test]
    fn a_deployed_stack_plans_no_writes() {
        let stack = Stack::parse(STACK).unwrap();
        let inventory = deployed(&stack, vec![device("dev1")]);
        let changes = plan(&stack, STACK, &inventory).unwrap();
        assert_eq!(
            lines(&changes),
            [
                "= application web: unchanged",
                "= placement of web: unchanged on device dev1",
                "= application api: unchanged",
            ]
        );
        assert_eq!(Summary::of(&changes).writes(), 0);
    }

    #[test]
    fn updates_name_the_changed_fields_and_carry_the_revision_read() {
        let stack = Stack::parse(STACK).unwrap();
        let inventory = deployed(&stack, vec![device("dev1")]);
        let text = STACK
            .replace("port: 8080", "port: 8081")
            .replace("hostnames: [web.example.test]", "hostnames: [web.example.test, www.example.test]");
        let changes = plan(&Stack::parse(&text).unwrap(), &text, &inventory).unwrap();
        let Change::UpdateApplication { id, revision, fields, spec } = &changes[0] else { panic!("{changes:?}") };
        assert_eq!((*id, *revision), (inventory.applications[0].id, 7));
        assert_eq!(fields, &["hostnames", "port"]);
        assert_eq!(spec.port, 8081);
        assert_eq!(changes[0].to_string(), "~ application web: update hostnames, port");
        assert_eq!(changes[2].action(), Action::Unchanged);
    }

    #[test]
    fn moving_to_another_device_updates_the_placement_in_place() {
        let stack = Stack::parse(STACK).unwrap();
        let mut inventory = deployed(&stack, vec![device("dev1")]);
        inventory.devices.push(device("dev2"));
        let text = STACK.replace("device: dev1", "device: dev2");
        let changes = plan(&Stack::parse(&text).unwrap(), &text, &inventory).unwrap();
        assert_eq!(changes[1].to_string(), "~ placement of web: update device dev1 -> device dev2");
        let Change::UpdatePlacement { id, revision, target, .. } = &changes[1] else { panic!("{changes:?}") };
        assert_eq!((*id, *revision), (inventory.placements[0].id, 8));
        assert_eq!(
            target.spec(inventory.applications[0].id),
            PlacementSpec::ServingDevice {
                application_id: inventory.applications[0].id,
                device_id: inventory.devices[1].id
            }
        );
    }

    #[test]
    fn an_existing_application_without_a_placement_gets_one() {
        let stack = Stack::parse(STACK).unwrap();
        let mut inventory = deployed(&stack, vec![device("dev1")]);
        inventory.placements.clear();
        let changes = plan(&stack, STACK, &inventory).unwrap();
        assert_eq!(changes[1].to_string(), "+ placement of web: create on device dev1");
    }

    #[test]
    fn a_missing_device_is_an_error_at_its_line() {
        let stack = Stack::parse(STACK).unwrap();
        let inventory = Inventory { devices: vec![device("other")], ..Inventory::default() };
        let error = plan(&stack, STACK, &inventory).unwrap_err();
        assert_eq!(error.field.as_deref(), Some("applications[0].placement.device"));
        assert_eq!(error.line, Some(11), "{error}");
        assert!(error.to_string().contains("no device named dev1"), "{error}");
    }

    #[test]
    fn cloud_placements_resolve_cloud_pools_only() {
        let text = STACK.replace(
            "      strategy: serving-device\n      device: dev1\n",
            "      strategy: cloud\n      pool: hosts\n",
        );
        let stack = Stack::parse(&text).unwrap();
        let cloud = pool("hosts", PoolKind::Cloud);
        let inventory = Inventory { pools: vec![cloud.clone()], ..Inventory::default() };
        let changes = plan(&stack, &text, &inventory).unwrap();
        assert_eq!(
            changes[1],
            Change::CreatePlacement {
                application: "web".parse().unwrap(),
                target: Target::Cloud { pool: Some((cloud.id, cloud.spec.name.clone())), region: None }
            }
        );

        let inventory = Inventory { pools: vec![pool("hosts", PoolKind::Devices)], ..Inventory::default() };
        let error = plan(&stack, &text, &inventory).unwrap_err();
        assert_eq!(error.field.as_deref(), Some("applications[0].placement.pool"));
        assert!(error.message.contains("cloud pool"), "{error}");

        let error = plan(&stack, &text, &Inventory::default()).unwrap_err();
        assert_eq!(error.line, Some(11), "{error}");
    }

    #[test]
    fn hostnames_are_checked_before_anything_is_written() {
        let text = STACK.replace("hostnames: [api.example.test]", "hostnames: [web.example.test]");
        let stack = Stack::parse(&text).unwrap();
        let inventory = Inventory { devices: vec![device("dev1")], ..Inventory::default() };
        let error = plan(&stack, &text, &inventory).unwrap_err();
        assert_eq!(error.field.as_deref(), Some("applications[1].hostnames[0]"));
        assert!(error.message.contains("also declared by application web"), "{error}");

        let stack = Stack::parse(STACK).unwrap();
        let mut other = stack.applications[1].spec.clone();
        other.name = "legacy".parse().unwrap();
        let inventory = Inventory {
            devices: vec![device("dev1")],
            applications: vec![application(&other, 3)],
            ..Inventory::default()
        };
        let error = plan(&stack, STACK, &inventory).unwrap_err();
        assert!(error.message.contains("belongs to application legacy"), "{error}");
        assert_eq!(error.line, Some(13), "{error}");
    }

    #[test]
    fn a_short_code_the_server_generated_is_not_a_change() {
        let text = STACK.replace("    port: 9000\n", "    port: 9000\n    access:\n      short_code: {}\n");
        let stack = Stack::parse(&text).unwrap();
        let mut inventory = deployed(&stack, vec![device("dev1")]);
        inventory.applications[1].spec.access.short_code =
            Some(ShortCodeAccess { code: Some("abc123xyz".into()), expires_at: None });
        let changes = plan(&stack, &text, &inventory).unwrap();
        assert_eq!(changes[2].action(), Action::Unchanged, "{changes:?}");

        // A code written in the file is the user's and does count.
        let text = text.replace("short_code: {}", "short_code: {code: other123}");
        let changes = plan(&Stack::parse(&text).unwrap(), &text, &inventory).unwrap();
        let Change::UpdateApplication { fields, .. } = &changes[2] else { panic!("{changes:?}") };
        assert_eq!(fields, &["access"]);
    }

    #[test]
    fn applications_outside_the_stack_are_left_alone() {
        let stack = Stack::parse(STACK).unwrap();
        let mut inventory = deployed(&stack, vec![device("dev1")]);
        let mut other = stack.applications[1].spec.clone();
        other.name = "legacy".parse().unwrap();
        other.hostnames = vec!["legacy.example.test".parse().unwrap()];
        inventory.applications.push(application(&other, 2));
        let changes = plan(&stack, STACK, &inventory).unwrap();
        assert_eq!(changes.len(), 3);
        assert!(changes.iter().all(|change| change.view().application != "legacy"));
    }
}
