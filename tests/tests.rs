//! Integration tests: one binary, one harness, a real nats-server per test.

#[macro_use]
mod harness;

mod api_tester;
mod async_listing;
mod async_tasks;
mod async_workers;
mod bk_monitor_flow;
mod bmw_clients;
mod bmw_metrics;
mod bridge_batch;
mod bridge_input;
mod bridge_security;
mod command_burst;
mod console_api;
mod daemon_cluster;
mod daemon_watches;
mod duplicates;
mod external_processes;
mod external_services;
mod guides;
mod hostile_names;
mod hostile_producers;
mod layering;
mod limits;
mod nats_cluster;
mod nats_restart;
mod nats_security;
mod network_faults;
mod openapi;
mod periodic_tasks;
mod raw_commands;
mod seed_walkthrough;
mod service;
mod storage_limits;
mod task_cli;
mod traces;
