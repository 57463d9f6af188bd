//! The API suite: every case is an async function taking the URL of a fresh, empty database.
//! Each case runs as its own test against SQLite; `postgres_suite` runs them all against
//! PostgreSQL when `EDGIBLE_ACC=1`, each on its own database of one throwaway cluster.
//!
//! Run: `cargo test -p edgible-server --test api` (add `EDGIBLE_ACC=1` for PostgreSQL).

mod access;
mod addresses;
mod agents;
mod binary;
mod cloud;
mod crud;
mod dns;
mod domains;
mod edges;
mod isolation;
mod migrations;
mod paging;
mod postgres;
mod s3;
mod support;
mod system;
mod usage;
mod validation;

/// Declares the cases once and generates the SQLite tests and the PostgreSQL suite.
macro_rules! suite {
    ($($module:ident :: $case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() -> anyhow::Result<()> {
                    let db = crate::support::SqliteDb::new()?;
                    crate::$module::$case(db.url()).await
                }
            )*
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn postgres_suite() -> anyhow::Result<()> {
            if std::env::var("EDGIBLE_ACC").as_deref() != Ok("1") {
                eprintln!("skipping postgres_suite: set EDGIBLE_ACC=1 to run the API suite against PostgreSQL");
                return Ok(());
            }
            let postgres = crate::postgres::Postgres::start()?;
            let mut failures = Vec::new();
            $(
                let case = stringify!($case);
                let url = postgres.create_database(case)?;
                match crate::$module::$case(url).await {
                    Ok(()) => eprintln!("postgres_suite: {case} ok"),
                    Err(error) => {
                        eprintln!("postgres_suite: {case} FAILED: {error:#}");
                        failures.push(case);
                    }
                }
            )*
            anyhow::ensure!(failures.is_empty(), "cases failed on PostgreSQL: {}", failures.join(", "));
            Ok(())
        }
    };
}

suite! {
    crud::crud_organizations,
    crud::crud_members,
    crud::crud_api_keys,
    crud::crud_device_pools,
    crud::crud_devices,
    crud::crud_applications,
    crud::crud_placements,
    crud::stale_revisions_are_refused,
    crud::names_are_unique_per_organization,
    crud::immutable_fields_are_refused,
    crud::dependents_block_deletes,
    crud::deleting_an_application_deletes_its_placement,
    crud::deleting_an_organization_deletes_everything,
    crud::members_reuse_users_and_keep_an_owner,
    isolation::other_organizations_objects_are_invisible,
    isolation::hostnames_are_unique_across_organizations,
    isolation::references_to_other_organizations_are_refused,
    addresses::concurrent_devices_get_distinct_addresses,
    addresses::addresses_are_released_and_reused,
    addresses::exhausted_pools_refuse_devices,
    paging::paging_walks_every_object_once,
    paging::bad_paging_parameters_are_refused,
    validation::invalid_values_name_the_field,
    validation::malformed_requests_are_refused,
    validation::keys_must_be_valid,
    validation::scopes_are_enforced,
    system::bootstrap_only_runs_on_an_empty_database,
    system::whoami_describes_the_key,
    system::openapi_describes_every_collection,
    system::health_and_metrics,
    agents::enrollment_exchanges_the_token_once,
    agents::hello_gets_welcome_and_a_snapshot,
    agents::api_writes_push_deltas,
    agents::moving_a_placement_moves_the_application,
    agents::a_reconnecting_device_evicts_its_old_session,
    agents::unanswered_pings_close_the_session,
    agents::hostile_frames_get_error_frames,
    agents::reports_are_stored_and_served,
    agents::events_are_bounded_per_application,
    edges::crud_edges,
    edges::edges_enroll_and_follow_their_pool,
    edges::a_bad_edge_hello_is_refused,
    edges::certificates_are_signed_for_placed_applications,
    edges::the_ca_is_kept_across_restarts,
    domains::enforcement_is_off_without_zones_or_the_flag,
    domains::platform_zones_are_first_come_first_served,
    domains::domains_are_verified_with_a_real_dns_query,
    domains::a_second_organization_never_takes_over_a_verified_domain,
    domains::domain_requests_are_validated,
    access::passwords_are_set_by_admins_of_their_organization,
    access::application_keys_are_shown_once_and_stored_as_hashes,
    access::access_keys_grant_nothing_on_the_api,
    access::short_codes_are_generated_rotated_and_versioned,
    access::login_flow_signs_assertions_for_members,
    access::failed_logins_are_rate_limited,
    access::assertion_keys_rotate_with_a_grace_period,
    access::revocations_and_rotations_reach_the_device_at_once,
    usage::usage_is_summed_per_application_and_hour,
    usage::usage_is_scoped_to_organizations,
    usage::usage_parameters_are_checked,
    cloud::operators_are_made_by_platform_keys_only,
    cloud::only_operators_cloud_pools_run_cloud_hosts,
    cloud::cloud_placements_spread_and_refuse_when_full,
    cloud::placements_move_between_a_device_and_the_cloud,
    cloud::applications_leave_hosts_that_stay_offline,
    migrations::migrations_are_refused_before_anything_starts,
    migrations::a_stateful_migration_ships_its_volume_and_moves_the_route,
    migrations::a_stateless_migration_through_the_placement_drains_the_source,
    migrations::a_failure_in_each_phase_rolls_back,
    migrations::a_step_that_times_out_rolls_back,
    migrations::a_restart_in_the_middle_of_ship_resumes_it,
}
