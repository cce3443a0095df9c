# shellcheck shell=bash disable=SC2034  # dry_run and args are read by the sourcing script
# Sourced by the launch scripts: splits the command line into positional arguments and the
# shared flags --dry-run and -h/--help.
#   parse_launch_args N "$@"  ->  sets dry_run (0/1) and args (the positionals, an array);
#   prints the caller's usage and exits 2 when fewer than N positionals are given.
# The caller defines usage() before sourcing this file.

parse_launch_args() {
  local needed=$1
  shift
  dry_run=0
  args=()
  local a
  for a in "$@"; do
    case "$a" in
      --dry-run) dry_run=1 ;;
      -h|--help) usage; exit 0 ;;
      *) args+=("$a") ;;
    esac
  done
  if [ "${#args[@]}" -lt "$needed" ]; then
    usage >&2
    exit 2
  fi
}
