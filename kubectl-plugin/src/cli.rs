//! Command line: the conventions of kubectl plugins (`--kubeconfig`,
//! `--context`, `-n`, `-A`, `-h`) on every subcommand, and one struct of
//! arguments per subcommand.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use rm_crds::DeviceType;
use rm_operator::config::{OperatorConfig, Overrides, parse_priority, parse_type_value};

/// Where InferenceWorkloads run and why, the cluster's accelerators, and the
/// node agents' compile caches (rm-abstract).
#[derive(Parser, Debug)]
#[command(
    name = "kubectl inference",
    bin_name = "kubectl inference",
    version,
    about
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every subcommand accepts, before or after its name.
#[derive(Args, Debug, Clone, Default)]
pub struct GlobalArgs {
    /// Path to the kubeconfig file (default: $KUBECONFIG, else ~/.kube/config).
    #[arg(long, global = true, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// Namespace (default: the context's namespace, else "default").
    #[arg(short = 'n', long, global = true, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
    /// Every namespace.
    #[arg(short = 'A', long, global = true)]
    pub all_namespaces: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Each workload: device, resource, replicas ready/wanted, phase and the
    /// reason of the device choice; with NAME also its pods, nodes and devices.
    Status(StatusArgs),
    /// Per node: capacity, allocatable, in use and free devices per type,
    /// node health; totals per type.
    Devices(DevicesArgs),
    /// Why a workload runs on its device: the priority list, the candidates
    /// and their free counts, the decision, and what would change it.
    Explain(ExplainArgs),
    /// The node agents' compile caches (entries, sizes, hits), read through
    /// the apiserver's pod proxy.
    Cache(CacheArgs),
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Workload name; without it, every workload in the namespace.
    pub name: Option<String>,
    /// After listing, print a line each time a workload changes.
    #[arg(short = 'w', long)]
    pub watch: bool,
    /// Output format.
    #[arg(short = 'o', long, value_enum)]
    pub output: Option<OutputFormat>,
}

#[derive(Args, Debug)]
pub struct DevicesArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Output format (json/yaml print the rows as data).
    #[arg(short = 'o', long, value_enum)]
    pub output: Option<OutputFormat>,
}

#[derive(Args, Debug)]
pub struct ExplainArgs {
    /// Workload name.
    pub name: String,
    #[command(flatten)]
    pub config: ConfigArgs,
}

#[derive(Args, Debug)]
pub struct CacheArgs {
    /// Output format (json/yaml print the entries as data).
    #[arg(short = 'o', long, value_enum)]
    pub output: Option<OutputFormat>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Wide,
    Json,
    Yaml,
}

/// The operator's configuration flags, with the operator's defaults and
/// parsers: the plugin must judge capacity as the operator does, and the
/// operator's configuration is not readable from the cluster yet.
#[derive(Args, Debug, Clone, Default)]
pub struct ConfigArgs {
    /// The operator's YAML configuration file (priorities, resourceNames, cpuFallback).
    #[arg(long = "config", value_name = "FILE")]
    pub config_file: Option<PathBuf>,
    /// Device priority as the operator has it, TYPE=N, repeatable or comma-separated (e.g. gpu=110).
    #[arg(long = "priority", value_name = "TYPE=N", value_delimiter = ',', value_parser = parse_priority_arg)]
    pub priorities: Vec<(DeviceType, u32)>,
    /// Extended resource of a type as the operator has it, TYPE=NAME (e.g. rbln=rebellions.ai/npu).
    #[arg(long = "resource-name", value_name = "TYPE=NAME", value_delimiter = ',', value_parser = parse_resource_arg)]
    pub resource_names: Vec<(DeviceType, String)>,
    /// Whether cpu ends the cluster's priority list (operator default: true).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub cpu_fallback: Option<bool>,
}

impl ConfigArgs {
    /// The operator's configuration for these flags, merged by the
    /// operator's own loader.
    pub fn load(&self) -> Result<OperatorConfig, rm_operator::config::ConfigError> {
        OperatorConfig::load(&Overrides {
            config_file: self.config_file.clone(),
            priorities: self.priorities.clone(),
            resource_names: self.resource_names.clone(),
            cpu_fallback: self.cpu_fallback,
            unschedulable_grace: None,
            ..Default::default()
        })
    }
}

fn parse_priority_arg(s: &str) -> Result<(DeviceType, u32), String> {
    parse_priority(s).map_err(|e| e.to_string())
}

fn parse_resource_arg(s: &str) -> Result<(DeviceType, String), String> {
    parse_type_value(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_go_before_or_after_the_subcommand() {
        let a = Cli::try_parse_from(["k", "-n", "x", "status", "w", "-o", "wide"]).unwrap();
        let b = Cli::try_parse_from(["k", "status", "w", "-n", "x", "-owide"]).unwrap();
        assert_eq!(a.global.namespace.as_deref(), Some("x"));
        assert_eq!(b.global.namespace.as_deref(), Some("x"));
    }

    #[test]
    fn operator_flags_reuse_the_operator_parsers_and_defaults() {
        let cli = Cli::try_parse_from([
            "k",
            "explain",
            "w",
            "--priority=gpu=110,rngd=5",
            "--resource-name",
            "atom=rebellions.ai/npu",
            "--cpu-fallback=false",
        ])
        .unwrap();
        let Command::Explain(args) = cli.command else {
            panic!("explain")
        };
        let config = args.config.load().unwrap();
        assert_eq!(
            config.priority_order(),
            [DeviceType::Gpu, DeviceType::Rbln, DeviceType::Furiosa]
        );
        assert_eq!(
            config.resource_name(DeviceType::Rbln),
            Some("rebellions.ai/npu")
        );
        let defaults = ConfigArgs::default().load().unwrap();
        assert_eq!(defaults, OperatorConfig::default());
        assert!(Cli::try_parse_from(["k", "explain", "w", "--priority=tpu=1"]).is_err());
    }
}
