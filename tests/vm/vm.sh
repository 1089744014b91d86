#!/usr/bin/env bash
# shellcheck disable=SC2054,SC2317 # commas in qemu options; trap handlers
# Run a shell command inside a throwaway Linux VM that has ublk_drv.
#
#   bash tests/vm/vm.sh [--kernel K] [--timeout SEC] [--out HOSTDIR] [--with HOSTDIR] [--disk MIB] [--env K=V]... [--] CMD...
#   npm run vm -- CMD          bun run vm -- CMD
#
#   --kernel K      the guest kernel: trixie (Debian 13's own, default) or
#                   backports (the newest trixie-backports cloud kernel)
#   --timeout SEC   kill the VM after SEC seconds of boot + CMD (default 1800)
#   --out HOSTDIR   copy what the guest wrote under /out into HOSTDIR
#   --with HOSTDIR  copy the files of HOSTDIR into the guest at /with (e.g. a
#                   build of the C reference server for the bench)
#   --disk MIB      give the guest a real block device: a sparse raw image of
#                   MIB MiB on the host (in the run's temporary directory,
#                   removed at exit), attached as virtio-blk with cache=none;
#                   it is /dev/vda once CMD has run `modprobe virtio_blk`
#   --env K=V       export K=V to CMD (repeatable); UBLK_BUN_VM=1 always
#
# CMD (all remaining words, joined by spaces) runs under the guest's busybox
# `sh -c` as root in /ublk-bun, with stdin from /dev/null. bash, fio, losetup
# (util-linux), mkfs.ext4 (e2fsprogs), bun and bunx are there too, and nbdkit
# with its memory, file and null plugins and delay, error, log, exportname and
# multi-conn filters, qemu-nbd and qemu-img, and the kernel's NBD client
# nbd-client; ublk_drv, loop and configfs are loaded, null_blk, nbd and
# virtio_blk are available to modprobe (ext4 is built in).
#
# The host kernel has no ublk_drv and no usable KVM, so the guest is a Debian
# trixie cloud kernel (trixie's or trixie-backports') under qemu TCG (software emulation, 10-15x slower
# than the host) with a busybox initramfs that also holds Bun, fio and the
# project tree (mounted nowhere: it is copied to /ublk-bun in the guest).
#
# The guest console streams to stdout. The script exits with the status of
# CMD, 124 if the timeout hit, or 125 if the VM failed some other way (kernel
# panic, qemu error). Files the guest writes under /out land in HOSTDIR.
#
# Everything downloaded or built is cached under $UBLK_BUN_VM_CACHE (default
# ~/.cache/ublk-bun-vm); once the cache is warm a run needs no network.
#
# Environment knobs (all optional):
#   UBLK_BUN_VM_CACHE    cache directory
#   UBLK_BUN_VM_KERNEL   default for --kernel (trixie)
#   UBLK_BUN_VM_TIMEOUT  default for --timeout (1800)
#   UBLK_BUN_VM_SMP      guest CPUs (2)
#   UBLK_BUN_VM_MEM      guest memory in MiB (3072)
#   UBLK_BUN_VM_MIRROR   Debian mirror URI (default: the one apt uses here)
#   UBLK_BUN_VM_REFRESH  set to 1 to fetch the newest kernel of the choice again
#   UBLK_BUN_VM_BUN      Bun binary to put in the guest
#                        (default: node_modules/.bin/bun)
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/../.." && pwd)
SELF="$SCRIPT_DIR/vm.sh"

CACHE=${UBLK_BUN_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ublk-bun-vm}
# Modules copied into the guest; their dependencies are added automatically.
GUEST_MODULES=(ublk_drv null_blk configfs loop)
# Copied when the kernel ships them, not needed to boot or test ublk.
# virtio_blk serves --disk (a module in Debian's cloud kernels).
GUEST_OPTIONAL_MODULES=(nbd virtio_blk)
# Host programs copied into the guest (with their libraries) in addition to
# busybox and Bun; they replace busybox applets of the same name.
# util-linux losetup is here for `losetup -f --show`, which busybox lacks,
# bash for scripts that need it. Note that busybox sh runs its own applets
# before searching PATH, so in `sh -c` spell out /usr/sbin/losetup.
# nbdkit serves the NBD target's tests (memory, file and null plugins; delay,
# error, log, exportname and multi-conn filters: the shared objects below); nbd-client
# (Debian's, not busybox's applet) attaches nbd.ko devices for the bench;
# qemu-nbd and qemu-img serve and read a qcow2 image (the README's example).
# mkfs.ext4 formats the --disk for the ext4 bench: busybox's mke2fs makes only
# ext2 (no extents, no journal), not what users run. mke2fs picks the file
# system type from its name, so the copy keeps that name; without
# /etc/mke2fs.conf it uses its built-in defaults, which are Debian's.
GUEST_HOST_TOOLS=(/usr/bin/fio /usr/sbin/losetup /usr/bin/bash /usr/bin/setpriv /usr/bin/nbdkit /usr/sbin/nbd-client
    /usr/bin/qemu-nbd /usr/bin/qemu-img /usr/sbin/mkfs.ext4)
# Shared objects that host tools load at run time (dlopen), so ldd of the tool
# does not name them: copied at the same paths, with their own libraries.
NBDKIT_DIR=/usr/lib/x86_64-linux-gnu/nbdkit
GUEST_HOST_PLUGINS=(
    "$NBDKIT_DIR"/plugins/nbdkit-{memory,file,null}-plugin.so
    "$NBDKIT_DIR"/filters/nbdkit-{delay,error,log,exportname,multi-conn}-filter.so
)
HOST_PACKAGES=(qemu-system-x86 qemu-utils busybox-static cpio fio xz-utils kmod mount git debian-archive-keyring nbdkit nbd-client
    e2fsprogs)
MARKER=UBLK-BUN-VM-EXIT

log() { printf 'vm: %s\n' "$*" >&2; }
die() { log "$*"; exit 125; }

usage() {
    sed -n '3,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$SELF"
    exit "${1:-0}"
}

# ---------------------------------------------------------------- arguments

timeout_s=${UBLK_BUN_VM_TIMEOUT:-1800}
kernel_choice=${UBLK_BUN_VM_KERNEL:-trixie}
out_dir=
with_dir=
disk_mib=
guest_env=()
while (($#)); do
    case $1 in
        --kernel) kernel_choice=${2:?--kernel needs trixie or backports}; shift 2 ;;
        --kernel=*) kernel_choice=${1#*=}; shift ;;
        --timeout) timeout_s=${2:?--timeout needs a value}; shift 2 ;;
        --timeout=*) timeout_s=${1#*=}; shift ;;
        --out) out_dir=${2:?--out needs a directory}; shift 2 ;;
        --out=*) out_dir=${1#*=}; shift ;;
        --with) with_dir=${2:?--with needs a directory}; shift 2 ;;
        --with=*) with_dir=${1#*=}; shift ;;
        --disk) disk_mib=${2:?--disk needs a size in MiB}; shift 2 ;;
        --disk=*) disk_mib=${1#*=}; shift ;;
        --env) guest_env+=("${2:?--env needs K=V}"); shift 2 ;;
        --env=*) guest_env+=("${1#*=}"); shift ;;
        -h|--help) usage 0 ;;
        --) shift; break ;;
        -*) log "unknown option: $1"; usage 2 >&2 ;;
        *) break ;;
    esac
done
# `npm run vm -- CMD` passes CMD without the `--`; `bun run vm -- CMD` too,
# but a user may still write `npm run vm -- -- CMD`, which lands here.
[[ ${1:-} == -- ]] && shift
(($#)) || { log "no command given"; usage 2 >&2; }
guest_cmd="$*"
# KERNEL_SUITE: where apt looks for the kernel (both are Debian 13's). CURRENT: the cache file naming the
# cached release of this choice; trixie's keeps the name it had before there was a choice, so a cache shared
# with an older vm.sh stays valid for both.
case $kernel_choice in
    trixie) KERNEL_SUITE=trixie CURRENT=current ;;
    backports) KERNEL_SUITE=trixie-backports CURRENT=current-backports ;;
    *) log "--kernel must be trixie or backports, got: $kernel_choice"; exit 2 ;;
esac
[[ $timeout_s =~ ^[0-9]+$ ]] || die "--timeout must be a whole number of seconds"
if [[ -n $disk_mib ]] && ! [[ $disk_mib =~ ^[1-9][0-9]{0,6}$ ]]; then
    log "--disk needs a size in MiB (1..9999999), got: $disk_mib"; exit 2
fi
for kv in "${guest_env[@]}"; do
    [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env expects NAME=VALUE, got: $kv"
done
smp=${UBLK_BUN_VM_SMP:-2}
mem=${UBLK_BUN_VM_MEM:-3072}
stdout_is_tty=0
[[ -t 1 ]] && stdout_is_tty=1

# ------------------------------------------------------------ host packages

# Install missing host tools with apt. `apt-get update` runs at most once and
# only when something is missing, so a provisioned machine does no network.
ensure_host_packages() {
    local missing=() p
    for p in "${HOST_PACKAGES[@]}"; do
        if [[ $(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null) != ii* ]]; then
            missing+=("$p")
        fi
    done
    ((${#missing[@]})) || return 0
    command -v apt-get >/dev/null || die "missing host packages (${missing[*]}) and no apt-get to install them"
    log "installing host packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 \
        || die "apt-get install ${missing[*]} failed"
}

# ------------------------------------------------------------------- kernel

# Print the Debian mirror this machine's apt already uses: the first URI of
# the first enabled deb822 stanza whose suites are not the security ones,
# else the first such `deb` line of the classic sources.list.
debian_mirror() {
    if [[ -n ${UBLK_BUN_VM_MIRROR:-} ]]; then
        echo "$UBLK_BUN_VM_MIRROR"
        return
    fi
    local f uri
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -r $f ]] || continue
        uri=$(awk '
            function flush() {
                if (types ~ /(^|[ \t])deb([ \t]|$)/ && enabled != "no" && uris != "" && plain) {
                    split(uris, u, /[ \t]+/); print u[1]; found = 1
                }
                types = ""; uris = ""; enabled = ""; plain = 0
            }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); if (found) exit; next }
            {
                key = tolower($0); sub(/:.*/, "", key)
                val = $0; sub(/^[^:]*:[ \t]*/, "", val)
                if (key == "types") types = val
                else if (key == "uris") uris = val
                else if (key == "enabled") enabled = tolower(val)
                else if (key == "suites") {
                    n = split(val, s, /[ \t]+/)
                    for (i = 1; i <= n; i++)
                        if (s[i] != "" && s[i] !~ /-security$/ && s[i] !~ /\/updates$/) plain = 1
                }
            }
            END { if (!found) flush() }
        ' "$f")
        if [[ -n $uri ]]; then echo "$uri"; return; fi
    done
    if [[ -r /etc/apt/sources.list ]]; then
        # deb [options] URI suite components...
        uri=$(sed -E 's/\[[^]]*\]//' /etc/apt/sources.list \
            | awk '$1 == "deb" && $3 !~ /security|\/updates$/ { print $2; exit }')
        if [[ -n $uri ]]; then echo "$uri"; return; fi
    fi
    die "cannot find a Debian mirror in /etc/apt (set UBLK_BUN_VM_MIRROR)"
}

# Options that point apt at a private state under the cache: our own sources
# list, package lists, download cache and an empty dpkg status, so nothing of
# the host's apt state is read or changed.
apt_private_opts() {
    local d=$CACHE/apt
    APT_OPTS=(
        -o "Dir::Etc::SourceList=$d/sources.list"
        -o Dir::Etc::SourceParts=/dev/null
        -o Dir::Etc::Preferences=/dev/null
        -o Dir::Etc::PreferencesParts=/dev/null
        -o "Dir::State::Lists=$d/lists"
        -o "Dir::State::status=$d/status"
        -o "Dir::Cache=$d/cache"
        -o APT::Architecture=amd64
        -o APT::Architectures::=amd64
        # The cache may not be readable by the _apt user; we are root anyway.
        -o APT::Sandbox::User=root
    )
}

# Write the private sources list; with $1 = trusted the index is not verified.
apt_private_sources() {
    local keyring=/usr/share/keyrings/debian-archive-keyring.gpg opts
    [[ -r /usr/share/keyrings/debian-archive-keyring.pgp ]] && keyring=/usr/share/keyrings/debian-archive-keyring.pgp
    opts="signed-by=$keyring"
    [[ ${1:-} == trusted ]] && opts="trusted=yes"
    echo "deb [$opts] $MIRROR $KERNEL_SUITE main" >"$CACHE/apt/sources.list"
}

# apt-get update with the private options. It fails on signature problems,
# which apt sometimes reports only as warnings, unless $1 = trusted.
apt_private_update() {
    local out
    if out=$(apt-get "${APT_OPTS[@]}" update 2>&1); then
        [[ ${1:-} == trusted ]] && return 0
        grep -qE '^(W|E): .*(NO_PUBKEY|not signed|EXPKEYSIG|signature)' <<<"$out" || return 0
    fi
    printf '%s\n' "$out" | sed 's/^/vm:   /' >&2
    return 1
}

# Print the newest cloud kernel release of the suite, e.g.
# 6.12.117+deb13-cloud-amd64. Up to 6.12 Debian packs the kernel and its
# modules in linux-image-<kver>-unsigned; from 6.19 on the image is in
# linux-binary-unsigned-<kver>, the modules in linux-modules-<kver> and
# modules.builtin and the config in linux-base-<kver>.
newest_kernel() {
    apt-cache "${APT_OPTS[@]}" search --names-only \
        '^linux-(image-[0-9].*-cloud-amd64-unsigned|binary-unsigned-[0-9].*-cloud-amd64)$' \
        | awk '{ print $1 }' | sed -E 's/^linux-(image|binary-unsigned)-//; s/-unsigned$//' \
        | sort -V | tail -n 1
}

# Print the packages that together hold kernel $1 and its modules.
kernel_packages() {
    local kver=$1 p
    if apt-cache "${APT_OPTS[@]}" show "linux-image-$kver-unsigned" >/dev/null 2>&1; then
        echo "linux-image-$kver-unsigned"
        return
    fi
    for p in "linux-binary-unsigned-$kver" "linux-modules-$kver" "linux-base-$kver"; do
        apt-cache "${APT_OPTS[@]}" show "$p" >/dev/null 2>&1 && echo "$p"
    done
}

# Download the newest cloud kernel of $KERNEL_SUITE and keep its vmlinuz plus
# the modules we need, decompressed, with a modules.dep.
fetch_kernel() {
    MIRROR=$(debian_mirror)
    log "fetching Debian $KERNEL_SUITE cloud kernel from $MIRROR (cached afterwards)"
    mkdir -p "$CACHE/apt/lists/partial" "$CACHE/apt/cache/archives/partial"
    : >"$CACHE/apt/status"
    apt_private_opts
    apt_private_sources
    if ! apt_private_update; then
        # An old debian-archive-keyring may predate the trixie signing keys.
        # Upgrading it through the host's own (already trusted) sources is the
        # clean fix.
        log "$KERNEL_SUITE index did not verify; upgrading debian-archive-keyring on the host"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends debian-archive-keyring; } >&2 || true
        apt_private_sources
        if ! apt_private_update; then
            # Last resort: accept the index unverified. The package only
            # provides a kernel for a throwaway, network-less test VM, and the
            # mirror is the one this host already installs software from.
            log "WARNING: still cannot verify the $KERNEL_SUITE index; continuing with trusted=yes"
            apt_private_sources trusted
            apt_private_update trusted || die "apt-get update for $KERNEL_SUITE failed"
        fi
    fi

    local kver pkgs
    kver=$(newest_kernel)
    [[ -n $kver ]] || die "no cloud-amd64 kernel image in $KERNEL_SUITE"
    mapfile -t pkgs < <(kernel_packages "$kver")
    log "downloading ${pkgs[*]}"

    local work pkg
    work=$(mktemp -d "$CACHE/tmp.kernel.XXXXXX")
    (cd "$work" && apt-get "${APT_OPTS[@]}" download -qq "${pkgs[@]}" >&2) || die "apt-get download ${pkgs[*]} failed"
    for pkg in "$work"/*.deb; do dpkg-deb -x "$pkg" "$work/x"; done
    pkg=${pkgs[*]}

    local mroot=$work/x/usr/lib/modules/$kver
    [[ -d $mroot ]] || mroot=$work/x/lib/modules/$kver
    local vmlinuz=$work/x/boot/vmlinuz-$kver config=$work/x/boot/config-$kver
    [[ -f $vmlinuz ]] || vmlinuz=$mroot/vmlinuz.unsigned
    [[ -f $config ]] || config=$mroot/config
    [[ -d $mroot && -f $vmlinuz && -f $mroot/modules.builtin ]] || die "unexpected layout in $pkg"

    local dest=$work/kernel
    mkdir -p "$dest/lib/modules/$kver"
    cp "$vmlinuz" "$dest/vmlinuz"
    if [[ -f $config ]]; then cp "$config" "$dest/config"; fi
    cp "$mroot"/modules.order "$mroot"/modules.builtin "$mroot"/modules.builtin.modinfo "$dest/lib/modules/$kver/"

    # Walk the dependency closure of GUEST_MODULES with modinfo.
    local -A path_of=() seen=()
    local f n
    while IFS= read -r -d '' f; do
        n=${f##*/}; n=${n%%.ko*}
        path_of[${n//-/_}]=$f
    done < <(find "$mroot/kernel" -name '*.ko*' -print0)
    local queue=("${GUEST_MODULES[@]}") m deps rel out
    for m in "${GUEST_OPTIONAL_MODULES[@]}"; do
        [[ -n ${path_of[$m]:-} ]] && queue+=("$m")
    done
    while ((${#queue[@]})); do
        m=${queue[0]//-/_}; queue=("${queue[@]:1}")
        [[ -z $m || -n ${seen[$m]:-} ]] && continue
        seen[$m]=1
        f=${path_of[$m]:-}
        if [[ -z $f ]]; then
            tr - _ <"$mroot/modules.builtin" | grep -q "/$m\.ko" || die "module $m is neither built in nor shipped in $pkg"
            continue
        fi
        deps=$(modinfo -F depends "$f")
        IFS=, read -r -a more <<<"$deps"
        queue+=("${more[@]}")
        rel=${f#"$mroot"/}
        out=$dest/lib/modules/$kver/${rel%.ko*}.ko
        mkdir -p "${out%/*}"
        case $f in
            *.ko.xz) xz -dc "$f" >"$out" ;;
            *.ko.zst) zstd -qdc "$f" >"$out" ;;
            *.ko.gz) gzip -dc "$f" >"$out" ;;
            *) cp "$f" "$out" ;;
        esac
    done
    depmod -b "$dest" "$kver"
    log "kernel $kver with modules: ${!seen[*]}"

    rm -rf "${CACHE:?}/kernel/$kver"
    mkdir -p "$CACHE/kernel"
    mv "$dest" "$CACHE/kernel/$kver"
    echo "$kver" >"$CACHE/kernel/$CURRENT"
    # Drop kernels an earlier refresh left behind, keeping the current one of
    # each choice (runs copy theirs under the lock, so none is in use).
    local keep
    keep=$(cat "$CACHE"/kernel/current* 2>/dev/null | sort -u)
    for f in "$CACHE"/kernel/*/; do
        f=${f%/}
        grep -qxF "${f##*/}" <<<"$keep" || rm -rf "$f"
    done
    rm -rf "$work"
}

# ---------------------------------------------------------- base initramfs

# Print the shared libraries (and the dynamic loader) an ELF file needs.
elf_libs() {
    ldd "$1" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'
}

# Copy a file into the staging root at the same path, following symlinks.
stage_copy() {
    mkdir -p "$2$(dirname "$1")"
    cp -L "$1" "$2$1"
}

# Build (or reuse) the cached base archive: busybox, Bun, fio and the other
# GUEST_HOST_TOOLS, their libraries, users and kernel modules. Sets BASE.
build_base() {
    local kver=$1 bun=$2
    local busybox=/bin/busybox t
    local libs
    libs=$( {
        elf_libs "$bun"
        for t in "${GUEST_HOST_TOOLS[@]}" "${GUEST_HOST_PLUGINS[@]}"; do elf_libs "$t"; done
    } | sort -u)
    # Hash of everything the archive is made from; stat is enough for the
    # Debian-packaged files, Bun is checksummed since npm may rewrite it.
    local hash
    hash=$( {
        echo "$kver"
        sha256sum "$SELF" "$bun"
        # shellcheck disable=SC2086
        stat -L -c '%n %s %Y' "$busybox" "${GUEST_HOST_TOOLS[@]}" "${GUEST_HOST_PLUGINS[@]}" $libs
    } | sha256sum | cut -c1-16)
    BASE=$CACHE/base-$kernel_choice-$hash.cpio
    [[ -s $BASE ]] && return 0

    log "building base initramfs (Bun $("$bun" --version), kernel $kver)"
    local stage
    stage=$(mktemp -d "$CACHE/tmp.base.XXXXXX")
    mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,usr/local/bin,lib,etc/ublk-bun-vm,root,proc,sys,dev,run,tmp,mnt,out,ublk-bun,var}
    ln -s /tmp "$stage/var/tmp"

    # Bun, the host tools and their shared libraries, at the paths ldd
    # resolved them to.
    cp "$bun" "$stage/usr/local/bin/bun"
    ln -s bun "$stage/usr/local/bin/bunx"
    local -A have=()
    for t in "${GUEST_HOST_TOOLS[@]}"; do
        stage_copy "$t" "$stage"
        have[${t##*/}]=1
        # As on a merged-/usr host, /bin/bash works as well as /usr/bin/bash.
        [[ $t == /usr/* && ! -e $stage${t#/usr} ]] && ln -s "$t" "$stage${t#/usr}"
    done

    # busybox-static with a symlink for every applet at its usual place,
    # except for the programs that came from the host.
    cp "$busybox" "$stage/bin/busybox"
    local a
    while IFS= read -r a; do
        [[ $a == bin/busybox || -n ${have[${a##*/}]:-} ]] && continue
        mkdir -p "$stage/$(dirname "$a")"
        ln -s /bin/busybox "$stage/$a"
    done < <("$busybox" --list-full)

    local l
    for l in $libs "${GUEST_HOST_PLUGINS[@]}"; do stage_copy "$l" "$stage"; done
    # A loader cache so libraries in non-default directories (such as ceph/,
    # which fio's librados uses) are found without relying on RUNPATH.
    # shellcheck disable=SC2086
    dirname $libs | sort -u >"$stage/etc/ld.so.conf"
    ldconfig -r "$stage"

    # Users: root plus nobody for tests that drop privileges.
    cat >"$stage/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/sh
EOF
    cat >"$stage/etc/group" <<'EOF'
root:x:0:
tty:x:5:
disk:x:6:
nogroup:x:65534:
EOF
    cat >"$stage/etc/shadow" <<'EOF'
root:*:19000:0:99999:7:::
nobody:*:19000:0:99999:7:::
EOF
    chmod 640 "$stage/etc/shadow"
    printf '127.0.0.1\tlocalhost\n::1\tlocalhost\n' >"$stage/etc/hosts"
    : >"$stage/etc/fstab"
    ln -s /proc/mounts "$stage/etc/mtab"

    cp -a "$CACHE/kernel/$kver/lib/modules" "$stage/lib/"

    # Uncompressed on purpose: under TCG the kernel inflates gzip slowly, while
    # qemu loads a plain archive into guest memory at host speed.
    (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"$stage.cpio"
    # Older bases of this choice are stale; the other choice's stays. (The
    # 16-hex-digit names are from before there was a choice.)
    rm -f "$CACHE/base-$kernel_choice-"*.cpio "$CACHE"/base-????????????????.cpio
    mv "$stage.cpio" "$BASE"
    rm -rf "$stage"
}

# ----------------------------------------------------------- per-run archive

# Print the project files to copy, relative to the repo root, one per line,
# parents before children: what git sees plus node_modules without the big
# Bun/TypeScript packages (the guest has Bun itself in /usr/local/bin).
project_files() {
    (
        cd "$REPO"
        {
            if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
                git ls-files -co --exclude-standard
            else
                find . -path ./.git -prune -o \( -type f -o -type l \) -print | sed 's|^\./||'
            fi | grep -v '^node_modules/' || true
            if [[ -d node_modules ]]; then
                find node_modules \( -path node_modules/bun -o -path node_modules/@oven \
                    -o -path node_modules/typescript -o -path 'node_modules/.bin/bun*' \
                    -o -path node_modules/.bin/tsc -o -path node_modules/.bin/tsserver \
                    -o -path node_modules/.cache \) -prune -o \( -type f -o -type l \) -print
            fi
        } | while IFS= read -r f; do
            # git lists tracked files even when deleted in the work tree.
            if [[ -e $f || -L $f ]]; then printf '%s\n' "$f"; fi
        done | awk '{
            n = split($0, part, "/"); p = part[1]
            for (i = 1; i < n; i++) { print p; p = p "/" part[i + 1] }
            print $0
        }' | LC_ALL=C sort -u
    )
}

# Quote a string for the guest's sh.
shq() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

# Write the per-run archive to $1: /init, the command, env and the project.
build_run_archive() {
    local dest=$1 stage=$RUN/stage
    mkdir -p "$stage/etc/ublk-bun-vm"
    install -m 0755 "$SCRIPT_DIR/init" "$stage/init"
    printf '%s\n' "$guest_cmd" >"$stage/etc/ublk-bun-vm/cmd"
    printf '%s\n' "$NONCE" >"$stage/etc/ublk-bun-vm/nonce"
    local kv
    {
        # The guest console is a tty, so tools would colour their output even
        # when ours goes to a CI log; --env can override this.
        ((stdout_is_tty)) || echo 'export NO_COLOR=1 TERM=dumb'
        for kv in "${guest_env[@]}"; do
            printf 'export %s=%s\n' "${kv%%=*}" "$(shq "${kv#*=}")"
        done
    } >"$stage/etc/ublk-bun-vm/env"
    # Archive names are ublk-bun/...: through this symlink cpio reads the files
    # straight from the work tree (only the last path component is lstat'ed,
    # and /ublk-bun itself comes from the base archive as a directory).
    ln -s "$REPO" "$stage/ublk-bun"
    # --with files are copied (small: a peer server's binaries), so /with is a real directory in the guest.
    if [[ -n $with_dir ]]; then mkdir -p "$stage/with" && cp -a "$with_dir"/. "$stage/with/"; fi
    (
        cd "$stage"
        {
            printf '%s\n' init etc etc/ublk-bun-vm etc/ublk-bun-vm/cmd etc/ublk-bun-vm/nonce etc/ublk-bun-vm/env
            project_files | sed 's|^|ublk-bun/|'
            if [[ -n $with_dir ]]; then
                echo with
                (cd "$stage" && find with -mindepth 1)
            fi
        } | cpio -o -H newc -R 0:0 --quiet
    ) >"$dest"
}

# ---------------------------------------------------------------------- main

ensure_host_packages
mkdir -p "$CACHE"

bun=${UBLK_BUN_VM_BUN:-$REPO/node_modules/.bin/bun}
[[ -e $bun ]] || die "no Bun binary at $bun (run npm install in $REPO)"
bun=$(readlink -f "$bun")
[[ $(head -c 4 "$bun" | od -An -c | tr -d ' ') == '177ELF' ]] || die "$bun is not an ELF binary"

RUN=$(mktemp -d "${TMPDIR:-/tmp}/ublk-bun-vm.XXXXXX")
qemu_pid=
cleanup() {
    if [[ -n $qemu_pid ]]; then kill -TERM "$qemu_pid" 2>/dev/null || true; fi
    rm -rf "$RUN"
}
trap cleanup EXIT
NONCE=$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')
build_run_archive "$RUN/run.cpio"

# The cache is prepared under a lock so concurrent runs neither build it twice
# nor see a base archive that another run (with a different vm.sh) replaces.
exec {lock_fd}>"$CACHE/lock"
flock "$lock_fd"
rm -rf "$CACHE"/tmp.*
# One early version of the kernel choice named trixie's kernel current-trixie.
if [[ -s $CACHE/kernel/current-trixie && ! -e $CACHE/kernel/current ]]; then
    mv "$CACHE/kernel/current-trixie" "$CACHE/kernel/current"
fi
rm -f "$CACHE/kernel/current-trixie"
# A kernel that is named but missing was dropped by an older vm.sh, which
# knew only one kernel: fetch it again.
# A cached kernel that lacks a module of the lists above (cached before the
# module was added to them) is fetched again too.
kernel_cache_complete() {
    local dir=$CACHE/kernel/$1 m
    [[ -f $dir/vmlinuz ]] || return 1
    for m in "${GUEST_MODULES[@]}" "${GUEST_OPTIONAL_MODULES[@]}"; do
        grep -q "/$m\.ko" "$dir/lib/modules/$1/modules.order" || continue # built in, or not shipped
        [[ -n $(find "$dir/lib/modules/$1/kernel" -name "$m.ko" -print -quit) ]] || return 1
    done
}
if [[ ${UBLK_BUN_VM_REFRESH:-0} == 1 || ! -s $CACHE/kernel/$CURRENT ]] \
      || ! kernel_cache_complete "$(cat "$CACHE/kernel/$CURRENT")"; then
    fetch_kernel
fi
KVER=$(cat "$CACHE/kernel/$CURRENT")
[[ -f $CACHE/kernel/$KVER/vmlinuz ]] || die "kernel cache is broken; rerun with UBLK_BUN_VM_REFRESH=1"
build_base "$KVER" "$bun"
# Linux unpacks concatenated cpio archives in order; the per-run one goes last.
cat "$BASE" "$RUN/run.cpio" >"$RUN/initrd"
cp "$CACHE/kernel/$KVER/vmlinuz" "$RUN/vmlinuz"
flock -u "$lock_fd"
exec {lock_fd}>&-
rm -f "$RUN/run.cpio"

qemu=(
    qemu-system-x86_64
    -accel tcg,thread=multi -cpu max -smp "$smp" -m "$mem"
    -nodefaults -no-user-config -display none -no-reboot
    # The console is qemu's stdout; signal=off so ^C is not read as input
    # (stdin is /dev/null anyway, it may not exist in CI).
    -chardev stdio,id=con,signal=off -serial chardev:con
    -kernel "$RUN/vmlinuz"
    -initrd "$RUN/initrd"
    # loglevel=3 keeps the boot quiet; /init raises it to show warnings.
    # mitigations=off: the guest is disposable and TCG is slow enough. tsc=reliable: under TCG the clocksource
    # watchdog sometimes finds the TSC "skewed" and switches to the emulated HPET mid-run, after which every clock
    # read (fio's, ours) traps into qemu and a benchmark slows down halfway (seen 158 s into a run). TCG's TSC
    # follows the host's, which is stable.
    -append "console=ttyS0 quiet loglevel=3 panic=-1 mitigations=off tsc=reliable"
)
if [[ -n $disk_mib ]]; then
    # Sparse: only what the guest writes takes host disk space. cache=none opens the image with O_DIRECT on the
    # host, so the guest's I/O reaches the host's disk instead of stopping in the host's page cache.
    truncate -s "${disk_mib}M" "$RUN/disk.img" || die "cannot create a ${disk_mib} MiB disk image in $RUN"
    qemu+=(-drive "file=$RUN/disk.img,if=virtio,format=raw,cache=none")
fi
if [[ -n $out_dir ]]; then
    # /out comes back as a tar stream over a virtio serial port (the cloud
    # kernel has no 9p; virtio_console is built in).
    : >"$RUN/out.tar"
    qemu+=(
        -device virtio-serial-pci,id=vser
        -chardev "file,id=outport,path=$RUN/out.tar"
        -device virtserialport,bus=vser.0,chardev=outport,name=ublk-bun-out
    )
fi

log "booting linux $KVER under qemu TCG ($smp cpus, $mem MiB, timeout ${timeout_s}s)"
start=$(date +%s.%N)

# The console goes through a fifo into sed, which passes it on live, drops the
# carriage returns, takes out the exit marker (writing it to a file) and notes
# a kernel panic. The kernel's final "reboot: Power down" line is printed at a
# level no loglevel hides, so sed drops it. Background jobs of a script ignore
# SIGINT, so on ^C sed keeps draining while the trap below stops qemu.
mkfifo "$RUN/console"
sed -u \
    -e 's/\r$//' \
    -e "/$MARKER:$NONCE:/{w $RUN/marker" -e "s/$MARKER:$NONCE:[0-9]*//" -e '/^$/d' -e '}' \
    -e "/Kernel panic - not syncing/w $RUN/panic" \
    -e '/^\[ *[0-9.]*\] reboot: Power down$/d' \
    <"$RUN/console" &
sed_pid=$!
timeout -k 10 "$timeout_s" "${qemu[@]}" </dev/null >"$RUN/console" &
qemu_pid=$!
interrupted=
on_signal() {
    interrupted=$1
    log "got SIG$1; stopping qemu"
    kill -TERM "$qemu_pid" 2>/dev/null || true
}
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM
trap 'on_signal HUP' HUP

qemu_rc=0
wait "$qemu_pid" || qemu_rc=$?
# A trapped signal interrupts wait; wait again until qemu is really gone.
while kill -0 "$qemu_pid" 2>/dev/null; do
    qemu_rc=0
    wait "$qemu_pid" || qemu_rc=$?
done
qemu_pid=
wait "$sed_pid" || true
trap - INT TERM HUP
elapsed=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')

if [[ -n $out_dir ]]; then
    mkdir -p "$out_dir"
    if [[ -s $RUN/out.tar ]]; then
        tar -x -f "$RUN/out.tar" -C "$out_dir" --no-same-owner --no-same-permissions \
            || log "could not unpack the guest's /out into $out_dir"
    fi
fi

if [[ -n $interrupted ]]; then
    log "interrupted by SIG$interrupted after ${elapsed}s"
    exit $((128 + $(kill -l "$interrupted")))
fi
status=
if [[ -s $RUN/marker ]]; then
    status=$(grep -o "$MARKER:$NONCE:[0-9][0-9]*" "$RUN/marker" | tail -n 1 || true)
    status=${status##*:}
fi
if [[ -n $status ]]; then
    log "guest command exited with status $status (${elapsed}s)"
    exit "$status"
fi
if [[ $qemu_rc == 124 || ($qemu_rc == 137 && ${elapsed%.*} -ge $timeout_s) ]]; then
    log "TIMEOUT: the guest command did not finish within ${timeout_s}s; qemu was killed"
    exit 124
fi
if [[ -s $RUN/panic ]]; then
    log "the guest kernel panicked after ${elapsed}s (see the console output above)"
elif [[ $qemu_rc != 0 ]]; then
    log "qemu exited with status $qemu_rc after ${elapsed}s before the guest command finished"
else
    log "the guest powered off or rebooted after ${elapsed}s without reporting an exit status"
fi
exit 125
