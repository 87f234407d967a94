# shellcheck shell=bash
# scripts/services.sh — sourced by scripts/test and scripts/run.
#
# ensure_services makes DATABASE_URL and REDIS_URL point at something that
# answers: the services the caller configured (or the defaults) when they are
# reachable, otherwise PRIVATE instances under .local/ (PostgreSQL on
# 127.0.0.1:55432, Redis on 127.0.0.1:56379), installing the Debian packages
# first if the binaries are missing. stop_services stops only what this shell
# started; callers register it with `trap stop_services EXIT`.
#
# Safe under `set -euo pipefail`. Everything it defines is prefixed imd_ / _IMD_
# except the two public functions.

IMD_ROOT=${IMD_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
IMD_LOCAL="$IMD_ROOT/.local"
IMD_PRIVATE_PG_PORT=55432
IMD_PRIVATE_REDIS_PORT=56379
# How long a freshly started service may take to answer (seconds).
IMD_SERVICE_START_TIMEOUT=${IMD_SERVICE_START_TIMEOUT:-60}

_IMD_STARTED_PG=""    # data directory of the PostgreSQL this shell started
_IMD_STARTED_REDIS="" # port of the Redis this shell started
_IMD_PG_BINDIR=""
_IMD_APT_UPDATED=""

imd_log() { printf '[services] %s\n' "$*" >&2; }

# imd_url_hostport URL DEFAULT_PORT prints "host port" for
# scheme://[user[:pass]@]host[:port][/path][?query]; [ipv6] hosts are accepted.
imd_url_hostport() {
	local url=$1 default_port=$2 rest host port
	rest=${url#*://}   # drop scheme
	rest=${rest%%/*}   # drop /path
	rest=${rest%%\?*}  # drop ?query (when there is no path)
	rest=${rest##*@}   # drop userinfo (a password may contain '@', so the last one)
	if [[ $rest == \[* ]]; then
		host=${rest%%]*}
		host=${host#[}
		rest=${rest#*]}
		port=${rest#:}
	elif [[ $rest == *:* ]]; then
		host=${rest%:*}
		port=${rest##*:}
	else
		host=$rest
		port=""
	fi
	[[ -n $host ]] || host=localhost
	[[ $port =~ ^[0-9]+$ ]] || port=$default_port
	printf '%s %s\n' "$host" "$port"
}

# imd_tcp_open HOST PORT: true if something accepts TCP connections there.
imd_tcp_open() {
	timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

imd_pg_reachable() { # URL
	local hp host port
	hp=$(imd_url_hostport "$1" 5432)
	read -r host port <<<"$hp"
	if command -v pg_isready >/dev/null 2>&1; then
		# -d takes the whole URL, so socket hosts (?host=/run/...) work too.
		pg_isready -q -t 3 -d "$1" >/dev/null 2>&1
	else
		imd_tcp_open "$host" "$port"
	fi
}

# imd_redis_reachable URL: true if a Redis there answers PING (+PONG, or an
# -NOAUTH/-ERR reply, which still proves a Redis is listening).
imd_redis_reachable() {
	local hp host port
	hp=$(imd_url_hostport "$1" 6379)
	read -r host port <<<"$hp"
	timeout 3 bash -c '
		exec 3<>"/dev/tcp/$1/$2" || exit 1
		printf "PING\r\n" >&3
		IFS= read -r -t 2 line <&3 || exit 1
		[[ $line == +PONG* || $line == -* ]]' _ "$host" "$port" 2>/dev/null
}

# imd_wait_until SECONDS WHAT CMD...: poll CMD every 100 ms until it succeeds.
imd_wait_until() {
	local seconds=$1 what=$2
	shift 2
	local deadline=$((SECONDS + seconds))
	until "$@"; do
		if ((SECONDS >= deadline)); then
			imd_log "$what did not become ready within ${seconds}s"
			return 1
		fi
		sleep 0.1
	done
}

imd_as_root() { # runs a command as root (directly, or via passwordless sudo)
	if [[ $(id -u) -eq 0 ]]; then
		"$@"
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
		sudo -n "$@"
	else
		imd_log "need root to run: $*"
		return 1
	fi
}

imd_apt_install() { # PACKAGE...
	if ! command -v apt-get >/dev/null 2>&1; then
		imd_log "apt-get not found; install $* yourself or set DATABASE_URL/REDIS_URL to running services"
		return 1
	fi
	if [[ -z $_IMD_APT_UPDATED ]]; then
		imd_log "apt-get update"
		imd_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq || return 1
		_IMD_APT_UPDATED=1
	fi
	imd_log "apt-get install -y $*"
	imd_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2 || return 1
}

imd_pg_bindir() { # prints the newest /usr/lib/postgresql/*/bin that has initdb
	local d best=""
	for d in /usr/lib/postgresql/*/bin; do
		[[ -x $d/initdb ]] || continue
		if [[ -z $best ]] || [[ $(printf '%s\n%s\n' "$best" "$d" | sort -V | tail -n1) == "$d" ]]; then
			best=$d
		fi
	done
	[[ -n $best ]] && printf '%s\n' "$best"
}

# imd_pg_user: PostgreSQL refuses to run as root, so as root the server runs as
# the "postgres" system user (created by the Debian package).
imd_pg_user() {
	if [[ $(id -u) -eq 0 ]]; then echo postgres; else id -un; fi
}

imd_as_pg_user() {
	local user
	user=$(imd_pg_user)
	if [[ $user == "$(id -un)" ]]; then
		"$@"
	elif command -v runuser >/dev/null 2>&1; then
		runuser -u "$user" -- "$@"
	else
		su "$user" -s /bin/sh -c "$(printf '%q ' "$@")"
	fi
}

imd_start_private_pg() {
	local bindir pgdata sockdir logfile user major
	bindir=$(imd_pg_bindir) || true
	if [[ -z $bindir ]]; then
		imd_apt_install postgresql || return 1
		bindir=$(imd_pg_bindir) || {
			imd_log "initdb not found under /usr/lib/postgresql/*/bin after installing postgresql"
			return 1
		}
	fi
	user=$(imd_pg_user)
	pgdata="$IMD_LOCAL/pg"
	sockdir="$IMD_LOCAL/run"
	logfile="$IMD_LOCAL/pg.log"
	mkdir -p "$pgdata" "$sockdir"
	chmod 700 "$pgdata"
	chmod go+x "$IMD_LOCAL" # the server user must traverse it, whatever the umask
	if [[ $user != "$(id -un)" ]]; then
		chown -R "$user" "$pgdata" "$sockdir"
		touch "$logfile" && chown "$user" "$logfile"
		if ! imd_as_pg_user test -w "$pgdata"; then
			imd_log "user $user cannot reach $pgdata (a parent directory is not world-searchable);"
			imd_log "start PostgreSQL yourself and set DATABASE_URL"
			return 1
		fi
	fi

	if [[ -f $pgdata/PG_VERSION ]]; then
		major=${bindir%/bin}
		major=${major##*/}
		if [[ $(<"$pgdata/PG_VERSION") != "$major" ]]; then
			imd_log "$pgdata was created by PostgreSQL $(<"$pgdata/PG_VERSION"), binaries are $major: remove .local/pg"
			return 1
		fi
	else
		imd_log "initdb $pgdata"
		imd_as_pg_user "$bindir/initdb" -D "$pgdata" -U postgres --auth=trust \
			-E UTF8 --locale=C --no-sync >"$IMD_LOCAL/initdb.log" 2>&1 || {
			imd_log "initdb failed; see .local/initdb.log"
			tail -n 20 "$IMD_LOCAL/initdb.log" >&2
			return 1
		}
	fi

	# Unix socket paths are limited to ~107 bytes; in a deeply nested checkout
	# the private server listens on TCP only (all clients here use TCP anyway).
	local sockopt="-k '$sockdir'"
	if ((${#sockdir} > 90)); then sockopt="-k ''"; fi

	imd_log "starting private PostgreSQL on 127.0.0.1:$IMD_PRIVATE_PG_PORT (data in .local/pg, log in .local/pg.log)"
	if ! imd_as_pg_user "$bindir/pg_ctl" -D "$pgdata" -l "$logfile" -W \
		-o "-p $IMD_PRIVATE_PG_PORT -h 127.0.0.1 $sockopt -c max_connections=200" start >/dev/null; then
		if imd_pg_reachable "postgres://127.0.0.1:$IMD_PRIVATE_PG_PORT"; then
			imd_log "a concurrent run started the private PostgreSQL first; using it"
			return 0
		fi
		imd_log "pg_ctl start failed; see .local/pg.log"
		tail -n 20 "$logfile" >&2
		return 1
	fi
	# Recorded before waiting, so stop_services also cleans up a slow start.
	_IMD_STARTED_PG=$pgdata
	_IMD_PG_BINDIR=$bindir
	imd_wait_until "$IMD_SERVICE_START_TIMEOUT" "private PostgreSQL" \
		imd_pg_reachable "postgres://127.0.0.1:$IMD_PRIVATE_PG_PORT" || {
		tail -n 20 "$logfile" >&2
		return 1
	}
}

imd_start_private_redis() {
	if ! command -v redis-server >/dev/null 2>&1; then
		imd_apt_install redis-server || return 1
	fi
	mkdir -p "$IMD_LOCAL"
	imd_log "starting private Redis on 127.0.0.1:$IMD_PRIVATE_REDIS_PORT (log in .local/redis.log)"
	redis-server --port "$IMD_PRIVATE_REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
		--daemonize yes --pidfile "$IMD_LOCAL/redis.pid" --dir "$IMD_LOCAL" \
		--logfile "$IMD_LOCAL/redis.log" >/dev/null || {
		imd_log "redis-server failed to start; see .local/redis.log"
		return 1
	}
	_IMD_STARTED_REDIS=$IMD_PRIVATE_REDIS_PORT
	imd_wait_until "$IMD_SERVICE_START_TIMEOUT" "private Redis" \
		imd_redis_reachable "redis://127.0.0.1:$IMD_PRIVATE_REDIS_PORT" || {
		tail -n 20 "$IMD_LOCAL/redis.log" >&2
		return 1
	}
}

ensure_services() {
	DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable}
	REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}
	local private_pg="postgres://postgres@127.0.0.1:$IMD_PRIVATE_PG_PORT/postgres?sslmode=disable"
	local private_redis="redis://127.0.0.1:$IMD_PRIVATE_REDIS_PORT/0"

	if imd_pg_reachable "$DATABASE_URL"; then
		imd_log "PostgreSQL: using $(imd_redact "$DATABASE_URL")"
	else
		imd_log "PostgreSQL at $(imd_redact "$DATABASE_URL") is not reachable"
		if imd_pg_reachable "$private_pg"; then
			# Left running by an earlier or concurrent run: use it, don't stop it.
			imd_log "PostgreSQL: reusing the private instance already on port $IMD_PRIVATE_PG_PORT"
		else
			imd_start_private_pg || return 1
		fi
		DATABASE_URL=$private_pg
	fi

	if imd_redis_reachable "$REDIS_URL"; then
		imd_log "Redis: using $(imd_redact "$REDIS_URL")"
	else
		imd_log "Redis at $(imd_redact "$REDIS_URL") is not reachable"
		if imd_redis_reachable "$private_redis"; then
			imd_log "Redis: reusing the private instance already on port $IMD_PRIVATE_REDIS_PORT"
		else
			imd_start_private_redis || return 1
		fi
		REDIS_URL=$private_redis
	fi
	export DATABASE_URL REDIS_URL
}

# imd_redact URL hides a password in the userinfo part.
imd_redact() {
	local url=$1
	if [[ $url =~ ^([a-z]+://[^:/@]*):[^@/]*@(.*)$ ]]; then
		printf '%s:***@%s\n' "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}"
	else
		printf '%s\n' "$url"
	fi
}

stop_services() {
	if [[ -n $_IMD_STARTED_PG ]]; then
		imd_log "stopping private PostgreSQL"
		imd_as_pg_user "$_IMD_PG_BINDIR/pg_ctl" -D "$_IMD_STARTED_PG" -m fast -w stop >/dev/null ||
			imd_log "pg_ctl stop failed (see .local/pg.log)"
		_IMD_STARTED_PG=""
	fi
	if [[ -n $_IMD_STARTED_REDIS ]]; then
		imd_log "stopping private Redis"
		if command -v redis-cli >/dev/null 2>&1; then
			redis-cli -h 127.0.0.1 -p "$_IMD_STARTED_REDIS" shutdown nosave >/dev/null 2>&1 || true
		elif [[ -f $IMD_LOCAL/redis.pid ]]; then
			kill "$(<"$IMD_LOCAL/redis.pid")" 2>/dev/null || true
		fi
		_IMD_STARTED_REDIS=""
	fi
}
