# Sourced by the launch scripts: the checks every one makes before it execs its launcher.
#   . "$(dirname "$0")/common.sh"
#   count_and_config NPROC "$usage" "$@"     # sets count, config and overrides (the arguments after CONFIG)
#   need_command torchrun "activate the environment first (. .venv/bin/activate)"
# Each failed check prints one line (the usage, or what is wrong and then the usage) and exits 2.

count_and_config() {
    local name=$1 usage=$2
    shift 2
    if [[ $# -lt 2 ]]; then
        echo "$usage" >&2
        exit 2
    fi
    if ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
        echo "$name must be a positive integer, got '$1'; $usage" >&2
        exit 2
    fi
    count=$1 config=$2
    overrides=("${@:3}")
}

need_command() {
    if ! command -v "$1" >/dev/null; then
        echo "$1 is not on PATH: $2" >&2
        exit 2
    fi
}
