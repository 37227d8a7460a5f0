#!/bin/sh
# Guest workload of the VM tier: exercise one virtio-fs mount with busybox
# tools (plus setfattr/getfattr copied from the host).
#
# Usage: workload.sh MOUNTPOINT [DATADIR]
#   DATADIR (optional) holds "block", 1 MiB of random bytes, and
#   "f_64M.sha256", the sha256 of the 64 MiB file built from it (see below).
#
# Output, one line per check:   OK <name> <detail>   or   FAIL <name> <detail>
# Informational lines start with "| " (ls listings).  The last line is
# "DONE fails=<n>"; the exit status is the number of failures (at most 100).
# Files f_0 .. f_64M are left in place so the host can compare them with the
# "OK write:<file> sha256=<hex>" lines; everything else is removed, then the
# mount is unmounted.
set -u
MNT=${1:?usage: workload.sh MOUNTPOINT [DATADIR]}
DATADIR=${2:-/nonexistent}
W=$MNT/vmtest
REF=/tmp/ref
FAILS=0

ok()   { echo "OK $*"; }
fail() { echo "FAIL $*"; FAILS=$((FAILS + 1)); }

# check NAME CMD...: OK when CMD succeeds; FAIL with its output otherwise
check() {
    _name=$1; shift
    if _out=$("$@" 2>&1); then ok "$_name"; else fail "$_name: $* -> $_out"; fi
}
# expect NAME ACTUAL EXPECTED
expect() {
    if [ "$2" = "$3" ]; then ok "$1 $2"; else fail "$1 got '$2' expected '$3'"; fi
}
sum() { sha256sum "$1" 2>/dev/null | cut -d' ' -f1; }
size() { stat -c %s "$1" 2>&1; }

mkdir -p "$REF"

# --- the mount ----------------------------------------------------------------
if grep -q " $MNT virtiofs " /proc/mounts; then
    ok "mounted $(grep " $MNT virtiofs " /proc/mounts | cut -d' ' -f1,3,4)"
else
    fail "mounted: $MNT is not a virtiofs mount: $(cat /proc/mounts | tr '\n' ';')"
    echo "DONE fails=$FAILS"; exit 1
fi
rm -rf "$W"
check mkdir:vmtest mkdir "$W"
cd "$W" || { fail "cd $W"; echo "DONE fails=$FAILS"; exit 1; }

# --- directories --------------------------------------------------------------
check mkdir-p mkdir -p a/b/c
check isdir:a/b/c test -d a/b/c

# --- files of several sizes: write, drop caches, read back ---------------------
# Files up to 1 MiB: random data made in /tmp (guest RAM) and hashed there,
# so the reference sum never went through the filesystem, then copied onto
# the mount.  The 64 MiB file is 64 copies of one random MiB, copy i stamped
# with "%015d\n" % i in its first 16 bytes (a misplaced or lost block changes
# the sum): written as 16 MiB chunks, then stamped in place with 16-byte
# writes.  Its reference sum comes from the host (DATADIR/f_64M.sha256,
# computed from DATADIR/block), since hashing 64 MiB twice and /dev/urandom
# are slow under TCG; without DATADIR the guest makes both itself.
if [ -f "$DATADIR/block" ] && [ -f "$DATADIR/f_64M.sha256" ]; then
    cp "$DATADIR/block" "$REF/block"; cp "$DATADIR/f_64M.sha256" "$REF/f_64M.sum"
else
    head -c 1048576 /dev/urandom > "$REF/block"
fi
stamp_blocks() { # stamp_blocks FILE NBLOCKS
    _i=0
    while [ $_i -lt "$2" ]; do
        printf '%015d\n' $_i | dd of="$1" bs=16 seek=$((_i * 65536)) conv=notrunc 2>/dev/null \
            || return 1
        _i=$((_i + 1))
    done
}
cat "$REF/block" "$REF/block" > "$REF/b2"
cat "$REF/b2" "$REF/b2" "$REF/b2" "$REF/b2" "$REF/b2" "$REF/b2" "$REF/b2" "$REF/b2" > "$REF/b16"
rm -f "$REF/b2"
if [ ! -f "$REF/f_64M.sum" ]; then
    cat "$REF/b16" "$REF/b16" "$REF/b16" "$REF/b16" > "$REF/big"
    stamp_blocks "$REF/big" 64
    sum "$REF/big" > "$REF/f_64M.sum"
    rm -f "$REF/big"
fi

FILES="f_0:0 f_1:1 f_4K:4096 f_1M:1048576 f_64M:67108864"
for spec in $FILES; do
    name=${spec%%:*}; bytes=${spec#*:}
    if [ "$name" = f_64M ]; then
        s=$(cat "$REF/f_64M.sum")
        cat "$REF/b16" "$REF/b16" "$REF/b16" "$REF/b16" > "$name" && stamp_blocks "$name" 64
    else
        head -c "$bytes" /dev/urandom > "$REF/$name"
        s=$(sum "$REF/$name"); echo "$s" > "$REF/$name.sum"
        cat "$REF/$name" > "$name"
    fi
    if [ $? -eq 0 ]; then ok "write:$name sha256=$s"; else fail "write:$name"; fi
    expect "size:$name" "$(size "$name")" "$bytes"
done
rm -f "$REF/b16" "$REF/block" "$REF/f_1M"
head -c 4096 /dev/urandom > "$REF/data4k"
cat "$REF/data4k" > t4k

check sync sync
if echo 3 > /proc/sys/vm/drop_caches; then ok drop_caches; else fail drop_caches; fi

for spec in $FILES; do
    name=${spec%%:*}
    expect "readback:$name" "$(sum "$name")" "$(cat "$REF/$name.sum")"
done
expect readback:t4k "$(sum t4k)" "$(sum "$REF/data4k")"
# a second read with an odd block size through dd
expect "readback-dd:f_1M" "$(dd if=f_1M bs=12345 2>/dev/null | sha256sum | cut -d' ' -f1)" \
    "$(cat "$REF/f_1M.sum")"

# --- listing ------------------------------------------------------------------
ls -la . | sed 's/^/| /'
names=$(ls -a . | tr '\n' ' ')
expect ls "$names" ". .. a f_0 f_1 f_1M f_4K f_64M t4k "
expect ls-la:f_4K "$(ls -la f_4K | awk '{print $5, $NF}')" "4096 f_4K"

# many entries: readdir must continue across several replies
mkdir many
i=0
while [ $i -lt 300 ]; do
    : > "many/entry-with-a-rather-long-name-to-fill-readdir-buffers-$i"
    i=$((i + 1))
done
expect readdir-count "$(ls many | wc -l)" 300
expect readdir-unique "$(ls many | sort -u | wc -l)" 300
check rm-many rm -r many

# --- rename -------------------------------------------------------------------
cp f_4K r1
check rename mv r1 a/b/c/r2
check rename:old-gone test ! -e r1
expect rename:content "$(sum a/b/c/r2)" "$(cat "$REF/f_4K.sum")"
printf 'first' > ra; printf 'second' > rb
check rename-replace mv ra rb
expect rename-replace:content "$(cat rb)" first
check rename-dir mv a/b a/b2
check rename-dir:moved test -f a/b2/c/r2 -a ! -e a/b

# --- hard links ----------------------------------------------------------------
check link ln f_1 h1
expect link:nlink "$(stat -c %h f_1)" 2
expect link:same-inode "$(stat -c %i h1)" "$(stat -c %i f_1)"
expect link:content "$(sum h1)" "$(cat "$REF/f_1.sum")"
check unlink-link rm h1
expect unlink-link:nlink "$(stat -c %h f_1)" 1

# --- symlinks -----------------------------------------------------------------
check symlink ln -s f_4K s1
check symlink:is-link test -L s1
expect readlink "$(readlink s1)" f_4K
expect symlink:follow "$(sum s1)" "$(cat "$REF/f_4K.sum")"
check symlink-dangling ln -s does-not-exist s2
expect readlink-dangling "$(readlink s2)" does-not-exist
check symlink-dangling:no-target test ! -e s2

# --- permissions --------------------------------------------------------------
check chmod chmod 640 t4k
expect chmod:mode "$(stat -c %a t4k)" 640
check chmod-dir chmod 700 a
expect chmod-dir:mode "$(stat -c %a a)" 700
check chmod-x chmod u+x,g+x t4k
expect chmod-x:mode "$(stat -c %a t4k)" 750

# --- truncate (grow, shrink, zero) --------------------------------------------
zeros4k=$(head -c 4096 /dev/zero | sha256sum | cut -d' ' -f1)
check truncate-grow truncate -s 8192 t4k
expect truncate-grow:size "$(size t4k)" 8192
expect truncate-grow:head "$(head -c 4096 t4k | sha256sum | cut -d' ' -f1)" "$(sum "$REF/data4k")"
expect truncate-grow:tail-zero "$(tail -c 4096 t4k | sha256sum | cut -d' ' -f1)" "$zeros4k"
check truncate-shrink truncate -s 100 t4k
expect truncate-shrink:size "$(size t4k)" 100
expect truncate-shrink:content "$(sum t4k)" "$(head -c 100 "$REF/data4k" | sha256sum | cut -d' ' -f1)"
check sync2 sync
echo 3 > /proc/sys/vm/drop_caches
expect truncate-shrink:after-drop "$(sum t4k)" "$(head -c 100 "$REF/data4k" | sha256sum | cut -d' ' -f1)"
check truncate-zero truncate -s 0 t4k
expect truncate-zero:size "$(size t4k)" 0

# --- partial overwrite and append ---------------------------------------------
printf 'abcdef' > pw
check overwrite sh -c 'printf XY | dd of=pw bs=1 seek=2 conv=notrunc 2>/dev/null'
expect overwrite:content "$(cat pw)" abXYef
printf 'gh' >> pw
expect append:content "$(cat pw)" abXYefgh

# --- unlink / rmdir -----------------------------------------------------------
check unlink rm pw
check unlink:gone test ! -e pw
check rmdir-nonempty:refused sh -c '! rmdir a/b2 2>/dev/null'
check rm-tree rm -r a
check rm-tree:gone test ! -e a
mkdir emptydir
check rmdir rmdir emptydir

# --- extended attributes ------------------------------------------------------
if command -v setfattr >/dev/null && command -v getfattr >/dev/null; then
    check xattr-set setfattr -n user.vmtest -v hello-xattr t4k
    expect xattr-get "$(getfattr --only-values -n user.vmtest t4k 2>&1)" hello-xattr
    check xattr-list sh -c 'getfattr -d t4k | grep -qx "user.vmtest=\"hello-xattr\""'
    check xattr-replace setfattr -n user.vmtest -v second t4k
    expect xattr-replaced "$(getfattr --only-values -n user.vmtest t4k 2>&1)" second
    check xattr-remove setfattr -x user.vmtest t4k
    check xattr-removed:absent sh -c '! getfattr -n user.vmtest t4k >/dev/null 2>&1'
else
    fail "xattr: setfattr/getfattr missing from the guest"
fi
check cleanup rm -f t4k rb s1 s2

# --- timestamps (the init set the clock from the host) -------------------------
: > stamp
now=$(date +%s); mt=$(stat -c %Y stamp)
if [ $((mt - now)) -le 2 ] && [ $((now - mt)) -le 2 ]; then
    ok "mtime $mt now $now"
else
    fail "mtime $mt far from guest clock $now"
fi
rm -f stamp

# --- statfs -------------------------------------------------------------------
set -- $(df -k -P "$MNT" | tail -n 1)
# Filesystem 1024-blocks Used Available Capacity Mounted-on
if [ "${2:-0}" -gt 0 ] 2>/dev/null && [ "${4:-0}" -gt 0 ] 2>/dev/null; then
    ok "df total_kib=$2 avail_kib=$4"
else
    fail "df: $(df -k -P "$MNT" 2>&1 | tr '\n' ';')"
fi

# --- what stays for the host, then umount -------------------------------------
expect final-listing "$(ls -a . | tr '\n' ' ')" ". .. f_0 f_1 f_1M f_4K f_64M "
cd /
check umount umount "$MNT"
if grep -q " $MNT " /proc/mounts; then fail "umount: still mounted"; else ok umount:gone; fi

echo "DONE fails=$FAILS"
[ $FAILS -gt 100 ] && FAILS=100
exit $FAILS
