/*
 * gio: the disk workload the test guest runs on its vhost-user disks
 * (crates/spindle/tests/common/gio.rs builds it with `gcc -static` and puts
 * it into the guest's initramfs).
 *
 *   gio [OPTIONS] DEV...
 *
 * Per device:
 * - --writers N threads (default 4), each owning --region-mib MiB of 4 KiB
 *   blocks. A writer loops over generations: optionally discards its region
 *   (--discard: the next writes allocate again on qcow2), writes every block
 *   with the pattern of (block, generation) in random-sized O_DIRECT writes
 *   (4 KiB to 1 MiB), fsyncs, then reads the region back and verifies it.
 * - --readers N threads (default 1) doing small random reads in the writers'
 *   regions while they write; each block must be zero or a whole pattern of
 *   its own block number (torn or misplaced data fails).
 * - --hold-threads N threads (default 0) reading heavily from a region after
 *   the writers' (--hold-mib, prefilled by the host with --base-gen) into a
 *   pool of --pool-mib MiB of buffers that stay in guest memory. Each buffer's
 *   checksum is kept and re-checked before the buffer is reused and at the
 *   end: after a live migration this catches guest pages that the disk's
 *   backend wrote but did not mark dirty.
 *
 * The host prefills the writers' regions and the hold region with generation
 * --base-gen (0: the disk reads as zeroes there).
 *
 * Commands, one per line on the console (stdin):
 * - `K<n>`: kill number n of the backend is about to happen. gio answers
 *   `GIO-KILL-ACK n=<n> inflight=<I/Os in progress> durable=<per writer>`
 *   where each writer's entry is the generation whose fsync completed before
 *   the ack (`z` after it: a discard was issued since, so blocks may read as
 *   zeroes). Writes that completed without a later fsync before the kill may
 *   be lost (a volatile write cache), so the verify accepts anything from the
 *   durable generation up to the last one written for them, until they are
 *   written again; everything else is verified exactly.
 * - `R<n>`: the backend runs again. Once every writer finished a generation
 *   after it, gio prints `GIO-RESUMED n=<n> after_ms=<since R> max_op_ms=<the
 *   longest single I/O since the kill's ack>`.
 * - `M<n>`: live migration number n is about to start. gio answers
 *   `GIO-MIGRATE-ACK n=<n> inflight=<I/Os in progress>`. Unlike `K`, nothing
 *   is relaxed: a migration must lose nothing, so every block is still
 *   verified exactly.
 * - `W<n>`: like `R` without ending a kill window (after a migration, or a
 *   cancelled one): once every writer finished two generations after it, gio
 *   prints `GIO-RESUMED n=<n> ...` as for `R`.
 * - `V<n>`: every holder re-checks the checksums of all its held buffers now
 *   (after a migration: the buffers read before it); gio then prints
 *   `GIO-HELD-CHECKED n=<n> checked=<buffers> hold_failures=<total so far>`.
 * - `S`: stop. Every thread finishes its generation or pass; gio prints
 *   `GIO-FINAL <dev> <gen>[+],...` (+: that generation was fsynced) and
 *   `GIO-SUMMARY ...` and exits 0 only when nothing failed.
 *
 * Every failure is one line: GIO-ERROR (an I/O error), GIO-VERIFY-FAIL (wrong
 * data on disk), GIO-HOLD-FAIL (a held buffer changed in guest memory),
 * GIO-HUNG (a thread did not finish within 60 s of the stop).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define BS 4096u
#define WORDS (BS / 8)
#define MAGIC 0x4f49474c444e5053ull /* "SPNDLGIO" in little-endian bytes */
#define MAX_CHUNK (1u << 20)
#define MAX_REPORTS 40

/* ---- the block pattern (common/gio.rs has the same) ---- */

static uint64_t mix64(uint64_t z)
{
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static uint64_t seed_of(uint64_t block, uint64_t gen)
{
	return block * 0xd1b54a32d192ed03ull ^ gen * 0x9e3779b97f4a7c15ull;
}

static void fill_block(uint64_t *w, uint64_t block, uint64_t gen)
{
	uint64_t s = seed_of(block, gen);
	w[0] = MAGIC;
	w[1] = block;
	w[2] = gen;
	w[3] = ~block ^ (gen << 32);
	for (unsigned i = 4; i < WORDS; i++)
		w[i] = mix64(s + i * 0x9e3779b97f4a7c15ull);
}

/* What a block holds: 0 zeroes, its generation (>0), or -1 anything else. */
static int64_t decode_block(const uint64_t *w, uint64_t block)
{
	if (w[0] != MAGIC) {
		for (unsigned i = 0; i < WORDS; i++)
			if (w[i])
				return -1;
		return 0;
	}
	uint64_t gen = w[2];
	if (w[1] != block || gen == 0 || gen > 0xffffffffull || w[3] != (~block ^ (gen << 32)))
		return -1;
	uint64_t s = seed_of(block, gen);
	for (unsigned i = 4; i < WORDS; i++)
		if (w[i] != mix64(s + i * 0x9e3779b97f4a7c15ull))
			return -1;
	return (int64_t)gen;
}

static uint64_t checksum(const uint64_t *w, size_t words)
{
	uint64_t h = 0xcbf29ce484222325ull;
	for (size_t i = 0; i < words; i++)
		h = (h ^ w[i]) * 0x100000001b3ull;
	return h;
}

/* ---- options, counters, output ---- */

static unsigned o_writers = 4, o_readers = 1, o_hold_threads = 0;
static uint64_t o_region_blocks = (4u << 20) / BS, o_hold_blocks = (32u << 20) / BS;
static uint64_t o_pool_bytes = 64u << 20;
static uint32_t o_base_gen = 0;
static int o_discard = 0;
static unsigned o_max_seconds = 300;
#define SLOT_BYTES (64u << 10)

static atomic_ullong n_writes, n_reads, n_flushes, n_discards, n_gens, n_verified, n_held;
static atomic_ullong n_errors, n_verify_fail, n_hold_fail;
static atomic_int in_io, stop_now;
static atomic_uint kills, restarts;
static atomic_ullong win_max_us, all_max_us;
static atomic_int reports;
static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;

static uint64_t now_us(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000u + (uint64_t)t.tv_nsec / 1000u;
}

static void vsay(const char *fmt, va_list ap)
{
	pthread_mutex_lock(&out_lock);
	vprintf(fmt, ap);
	putchar('\n');
	fflush(stdout);
	pthread_mutex_unlock(&out_lock);
}

static void say(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsay(fmt, ap);
	va_end(ap);
}

/* A failure line; after MAX_REPORTS of them only the counters go on. */
static void report(atomic_ullong *counter, const char *fmt, ...)
{
	atomic_fetch_add(counter, 1);
	int n = atomic_fetch_add(&reports, 1);
	if (n > MAX_REPORTS)
		return;
	if (n == MAX_REPORTS) {
		say("GIO-NOTE further failure lines suppressed (see GIO-SUMMARY)");
		return;
	}
	va_list ap;
	va_start(ap, fmt);
	vsay(fmt, ap);
	va_end(ap);
}

static void max_store(atomic_ullong *m, uint64_t v)
{
	uint64_t cur = atomic_load(m);
	while (v > cur && !atomic_compare_exchange_weak(m, &cur, v))
		;
}

/* 2*kills when no kill window is open, 2*kills+1 between `K` and `R`. */
static uint32_t epoch_now(void)
{
	uint32_t k = atomic_load(&kills), r = atomic_load(&restarts);
	return 2 * k + (k != r);
}

static uint32_t rnd(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return (uint32_t)(*s >> 16);
}

static void *aligned(size_t n)
{
	void *p = NULL;
	if (posix_memalign(&p, BS, n)) {
		say("GIO-FATAL cannot allocate %zu bytes", n);
		exit(2);
	}
	memset(p, 0, n);
	return p;
}

struct dev {
	const char *path, *name;
	struct writer *writers;
	unsigned char *pool;
};

enum op { OP_READ, OP_WRITE, OP_FLUSH, OP_DISCARD };
static const char *op_name[] = {"read", "write", "fsync", "discard"};

/* One I/O, timed; 0 on success. Errors are reported here. */
static int io(struct dev *d, int fd, enum op op, void *buf, size_t len, uint64_t off)
{
	atomic_fetch_add(&in_io, 1);
	uint64_t t0 = now_us();
	ssize_t r = 0;
	int err = 0;
	if (op == OP_READ || op == OP_WRITE) {
		r = op == OP_READ ? pread(fd, buf, len, (off_t)off) : pwrite(fd, buf, len, (off_t)off);
		if (r < 0)
			err = errno;
		else if ((size_t)r != len)
			err = EIO;
	} else if (op == OP_FLUSH) {
		if (fsync(fd))
			err = errno;
	} else {
		uint64_t range[2] = {off, len};
		if (ioctl(fd, BLKDISCARD, range))
			err = errno;
	}
	uint64_t lat = now_us() - t0;
	atomic_fetch_sub(&in_io, 1);
	max_store(&win_max_us, lat);
	max_store(&all_max_us, lat);
	atomic_ullong *count[] = {&n_reads, &n_writes, &n_flushes, &n_discards};
	atomic_fetch_add(count[op], 1);
	if (err) {
		report(&n_errors, "GIO-ERROR dev=%s op=%s off=%llu len=%zu errno=%d (%s)", d->name, op_name[op],
		       (unsigned long long)off, len, err, strerror(err));
		return -1;
	}
	return 0;
}

static int open_dev(struct dev *d)
{
	int fd = open(d->path, O_RDWR | O_DIRECT);
	if (fd < 0) {
		say("GIO-FATAL cannot open %s: %s", d->path, strerror(errno));
		exit(2);
	}
	return fd;
}

static uint32_t pick_len(uint64_t *rng, uint64_t left_blocks)
{
	static const uint32_t sizes[] = {1, 1, 2, 4, 16, 32, 64, 256};
	uint64_t n = sizes[rnd(rng) % 8];
	return (uint32_t)(n < left_blocks ? n : left_blocks);
}

/* ---- writers ---- */

struct blk {
	uint32_t durable;  /* generation known to be on disk (0: zeroes) */
	uint32_t written;  /* last generation whose write completed */
	uint32_t wepoch;   /* epoch of that completion */
	uint8_t zero_ok;   /* a discard completed since `durable` */
	uint8_t now_zero;  /* the last completed change was a discard */
	uint8_t unknown;   /* a write of it failed: any whole pattern or zero */
};

struct writer {
	struct dev *d;
	unsigned idx;
	uint64_t first, n;
	struct blk *st;
	uint64_t *buf;
	uint64_t rng;
	atomic_uint durable_gen;
	atomic_int discarded_since;
	atomic_uint gens_done;
	uint32_t gen;
	int last_durable;
	pthread_t th;
};

static void check_block(struct writer *w, uint64_t i, const uint64_t *data, uint32_t epoch)
{
	struct blk *b = &w->st[i];
	uint64_t block = w->first + i;
	int64_t got = decode_block(data, block);
	int ok;
	char want[64];
	if (b->unknown) {
		ok = got >= 0;
		snprintf(want, sizeof want, "any");
	} else if (b->wepoch == epoch && !(epoch & 1)) {
		uint32_t exp = b->now_zero ? 0 : b->written;
		ok = got == (int64_t)exp;
		snprintf(want, sizeof want, "%u", exp);
	} else {
		ok = (got >= (int64_t)b->durable && got <= (int64_t)b->written && got > 0) ||
		     (got == 0 && (b->zero_ok || b->durable == 0)) || got == (int64_t)b->durable;
		snprintf(want, sizeof want, "%u..%u%s", b->durable, b->written, b->zero_ok ? "|0" : "");
	}
	atomic_fetch_add(&n_verified, 1);
	if (!ok)
		report(&n_verify_fail, "GIO-VERIFY-FAIL dev=%s writer=%u block=%llu want=%s got=%lld%s", w->d->name, w->idx,
		       (unsigned long long)block, want, (long long)got, got < 0 ? " (not a pattern of this block)" : "");
}

/* Reads the region back in random-sized pieces and checks every block. */
static void verify_region(struct writer *w, int fd)
{
	uint64_t i = 0;
	while (i < w->n) {
		uint32_t len = pick_len(&w->rng, w->n - i);
		if (io(w->d, fd, OP_READ, w->buf, (size_t)len * BS, (w->first + i) * BS) == 0) {
			uint32_t epoch = epoch_now();
			for (uint32_t j = 0; j < len; j++)
				check_block(w, i + j, w->buf + (size_t)j * WORDS, epoch);
		}
		i += len;
	}
}

static void *writer_main(void *arg)
{
	struct writer *w = arg;
	int fd = open_dev(w->d);
	verify_region(w, fd);
	for (uint32_t gen = o_base_gen + 1; !atomic_load(&stop_now); gen++) {
		w->gen = gen;
		if (o_discard) {
			atomic_store(&w->discarded_since, 1);
			if (io(w->d, fd, OP_DISCARD, NULL, w->n * BS, w->first * BS) == 0) {
				uint32_t e = epoch_now();
				for (uint64_t i = 0; i < w->n; i++) {
					w->st[i].zero_ok = w->st[i].now_zero = 1;
					w->st[i].wepoch = e;
				}
			}
		}
		/* Every block once, from a random start, wrapping around. */
		uint64_t start = rnd(&w->rng) % w->n, done = 0;
		while (done < w->n) {
			uint64_t at = (start + done) % w->n;
			uint64_t run = w->n - at < w->n - done ? w->n - at : w->n - done;
			uint32_t len = pick_len(&w->rng, run);
			for (uint32_t j = 0; j < len; j++)
				fill_block(w->buf + (size_t)j * WORDS, w->first + at + j, gen);
			int r = io(w->d, fd, OP_WRITE, w->buf, (size_t)len * BS, (w->first + at) * BS);
			uint32_t e = epoch_now();
			for (uint32_t j = 0; j < len; j++) {
				struct blk *b = &w->st[at + j];
				if (r) {
					b->unknown = 1;
					continue;
				}
				b->written = gen;
				b->now_zero = 0;
				b->unknown = 0;
				b->wepoch = e;
			}
			done += len;
		}
		uint32_t issued = epoch_now();
		int durable = 0;
		if (io(w->d, fd, OP_FLUSH, NULL, 0, 0) == 0 && !(issued & 1) && epoch_now() == issued) {
			int all = 1;
			for (uint64_t i = 0; i < w->n; i++) {
				struct blk *b = &w->st[i];
				if (b->wepoch != issued || b->unknown) {
					all = 0;
					continue;
				}
				b->durable = b->now_zero ? 0 : b->written;
				b->zero_ok = 0;
			}
			if (all) {
				atomic_store(&w->discarded_since, 0);
				atomic_store(&w->durable_gen, gen);
				durable = 1;
			}
		}
		verify_region(w, fd);
		w->last_durable = durable;
		atomic_fetch_add(&w->gens_done, 1);
		atomic_fetch_add(&n_gens, 1);
	}
	close(fd);
	return NULL;
}

/* ---- small readers racing the writers ---- */

struct reader {
	struct dev *d;
	uint64_t rng;
	pthread_t th;
};

static void *reader_main(void *arg)
{
	struct reader *r = arg;
	int fd = open_dev(r->d);
	uint64_t blocks = o_writers * o_region_blocks;
	uint64_t *buf = aligned(16 * BS);
	while (!atomic_load(&stop_now)) {
		uint32_t len = 1 + rnd(&r->rng) % 4;
		uint64_t at = rnd(&r->rng) % (blocks - len + 1);
		if (io(r->d, fd, OP_READ, buf, (size_t)len * BS, at * BS))
			continue;
		for (uint32_t j = 0; j < len; j++) {
			atomic_fetch_add(&n_verified, 1);
			if (decode_block(buf + (size_t)j * WORDS, at + j) < 0)
				report(&n_verify_fail, "GIO-VERIFY-FAIL dev=%s reader block=%llu: not zero and not a pattern of this block",
				       r->d->name, (unsigned long long)(at + j));
		}
	}
	free(buf);
	close(fd);
	return NULL;
}

/* ---- heavy readers holding what they read ---- */

struct holder {
	struct dev *d;
	unsigned idx;
	uint64_t rng;
	uint64_t nslots;
	uint64_t *slot_block; /* first block read into each of my slots; ~0: none yet */
	uint64_t *slot_sum;
	pthread_t th;
};

/* `V<n>`: the request number, and how many holders have answered it. */
static atomic_uint held_req, held_done;
static atomic_ullong held_checked;

static uint64_t *slot_buf(struct holder *h, uint64_t s)
{
	return (uint64_t *)(h->d->pool + (s * o_hold_threads + h->idx) * (uint64_t)SLOT_BYTES);
}

static void check_slot(struct holder *h, uint64_t s)
{
	if (h->slot_block[s] == ~0ull)
		return;
	atomic_fetch_add(&n_held, 1);
	if (checksum(slot_buf(h, s), SLOT_BYTES / 8) != h->slot_sum[s])
		report(&n_hold_fail,
		       "GIO-HOLD-FAIL dev=%s slot=%llu block=%llu: the buffer changed in guest memory after its read completed",
		       h->d->name, (unsigned long long)(s * o_hold_threads + h->idx), (unsigned long long)h->slot_block[s]);
}

static void *holder_main(void *arg)
{
	struct holder *h = arg;
	int fd = open_dev(h->d);
	uint64_t first = o_writers * o_region_blocks, per = SLOT_BYTES / BS;
	unsigned answered = 0;
	while (!atomic_load(&stop_now)) {
		for (uint64_t s = 0; s < h->nslots && !atomic_load(&stop_now); s++) {
			unsigned req = atomic_load(&held_req);
			if (req != answered) {
				for (uint64_t t = 0; t < h->nslots; t++) {
					if (h->slot_block[t] != ~0ull)
						atomic_fetch_add(&held_checked, 1);
					check_slot(h, t);
				}
				answered = req;
				atomic_fetch_add(&held_done, 1);
			}
			check_slot(h, s);
			uint64_t at = first + rnd(&h->rng) % (o_hold_blocks - per + 1);
			uint64_t *buf = slot_buf(h, s);
			h->slot_block[s] = ~0ull;
			if (io(h->d, fd, OP_READ, buf, SLOT_BYTES, at * BS))
				continue;
			for (uint64_t j = 0; j < per; j++) {
				atomic_fetch_add(&n_verified, 1);
				int64_t got = decode_block(buf + j * WORDS, at + j);
				if (got != (int64_t)o_base_gen)
					report(&n_verify_fail, "GIO-VERIFY-FAIL dev=%s hold block=%llu want=%u got=%lld", h->d->name,
					       (unsigned long long)(at + j), o_base_gen, (long long)got);
			}
			h->slot_block[s] = at;
			h->slot_sum[s] = checksum(buf, SLOT_BYTES / 8);
		}
	}
	for (uint64_t s = 0; s < h->nslots; s++)
		check_slot(h, s);
	close(fd);
	return NULL;
}

/* ---- commands on the console ---- */

static struct dev *devs;
static int ndevs;
static atomic_uint resume_pending; /* n of the last R not yet answered with GIO-RESUMED */
static uint64_t resume_at;
static unsigned *resume_base;

static void kill_ack(unsigned n)
{
	atomic_store(&win_max_us, 0);
	atomic_store(&kills, n);
	char line[4096];
	size_t at = (size_t)snprintf(line, sizeof line, "GIO-KILL-ACK n=%u inflight=%d durable=", n, atomic_load(&in_io));
	for (int i = 0; i < ndevs && at < sizeof line - 64; i++) {
		at += (size_t)snprintf(line + at, sizeof line - at, "%s%s:", i ? ";" : "", devs[i].name);
		for (unsigned j = 0; j < o_writers && at < sizeof line - 32; j++) {
			struct writer *w = &devs[i].writers[j];
			at += (size_t)snprintf(line + at, sizeof line - at, "%s%u%s", j ? "," : "", atomic_load(&w->durable_gen),
					       atomic_load(&w->discarded_since) ? "z" : "");
		}
	}
	say("%s", line);
}

static void *stdin_main(void *arg)
{
	(void)arg;
	struct termios t;
	if (tcgetattr(0, &t) == 0) {
		t.c_lflag &= ~(tcflag_t)(ECHO | ECHONL);
		tcsetattr(0, TCSANOW, &t);
	}
	char line[64];
	size_t len = 0;
	for (;;) {
		char c;
		ssize_t r = read(0, &c, 1);
		if (r <= 0) {
			if (r < 0 && errno == EINTR)
				continue;
			return NULL;
		}
		if (c != '\n' && c != '\r') {
			if (len < sizeof line - 1)
				line[len++] = c;
			continue;
		}
		line[len] = 0;
		len = 0;
		if (line[0] == 'K') {
			kill_ack((unsigned)strtoul(line + 1, NULL, 10));
		} else if (line[0] == 'R') {
			unsigned n = (unsigned)strtoul(line + 1, NULL, 10);
			for (int i = 0; i < ndevs; i++)
				for (unsigned j = 0; j < o_writers; j++)
					resume_base[i * o_writers + j] = atomic_load(&devs[i].writers[j].gens_done);
			resume_at = now_us();
			atomic_store(&restarts, n);
			atomic_store(&resume_pending, n);
		} else if (line[0] == 'M') {
			say("GIO-MIGRATE-ACK n=%lu inflight=%d", strtoul(line + 1, NULL, 10), atomic_load(&in_io));
		} else if (line[0] == 'W') {
			unsigned n = (unsigned)strtoul(line + 1, NULL, 10);
			for (int i = 0; i < ndevs; i++)
				for (unsigned j = 0; j < o_writers; j++)
					resume_base[i * o_writers + j] = atomic_load(&devs[i].writers[j].gens_done);
			resume_at = now_us();
			atomic_store(&win_max_us, 0);
			atomic_store(&resume_pending, n);
		} else if (line[0] == 'V') {
			atomic_store(&held_done, 0);
			atomic_store(&held_checked, 0);
			atomic_store(&held_req, (unsigned)strtoul(line + 1, NULL, 10));
		} else if (line[0] == 'S') {
			atomic_store(&stop_now, 1);
		}
	}
}

static void check_held(void)
{
	static unsigned said;
	unsigned req = atomic_load(&held_req);
	if (req == said || !o_hold_threads || atomic_load(&held_done) < (unsigned)ndevs * o_hold_threads)
		return;
	said = req;
	say("GIO-HELD-CHECKED n=%u checked=%llu hold_failures=%llu", req, (unsigned long long)atomic_load(&held_checked),
	    (unsigned long long)atomic_load(&n_hold_fail));
}

static void check_resumed(void)
{
	unsigned n = atomic_load(&resume_pending);
	if (!n)
		return;
	for (int i = 0; i < ndevs; i++)
		for (unsigned j = 0; j < o_writers; j++)
			if (atomic_load(&devs[i].writers[j].gens_done) < resume_base[i * o_writers + j] + 2)
				return;
	atomic_store(&resume_pending, 0);
	say("GIO-RESUMED n=%u after_ms=%llu max_op_ms=%llu", n, (unsigned long long)((now_us() - resume_at) / 1000),
	    (unsigned long long)(atomic_load(&win_max_us) / 1000));
}

/* ---- main ---- */

static void usage(void)
{
	fprintf(stderr, "usage: gio [--writers N] [--region-mib M] [--readers N] [--hold-threads N] [--hold-mib M]\n"
			"           [--pool-mib M] [--base-gen G] [--discard] [--max-seconds S] DEV...\n");
	exit(2);
}

static int join_within(pthread_t th, uint64_t deadline_us)
{
	uint64_t left = deadline_us > now_us() ? deadline_us - now_us() : 0;
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	ts.tv_sec += (time_t)(left / 1000000u);
	ts.tv_nsec += (long)(left % 1000000u) * 1000;
	if (ts.tv_nsec >= 1000000000) {
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000;
	}
	return pthread_timedjoin_np(th, NULL, &ts);
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	int i = 1;
	for (; i < argc && argv[i][0] == '-'; i++) {
		const char *a = argv[i];
		if (!strcmp(a, "--discard")) {
			o_discard = 1;
			continue;
		}
		if (i + 1 >= argc)
			usage();
		unsigned long long v = strtoull(argv[++i], NULL, 10);
		if (!strcmp(a, "--writers"))
			o_writers = (unsigned)v;
		else if (!strcmp(a, "--region-mib"))
			o_region_blocks = v * (1u << 20) / BS;
		else if (!strcmp(a, "--readers"))
			o_readers = (unsigned)v;
		else if (!strcmp(a, "--hold-threads"))
			o_hold_threads = (unsigned)v;
		else if (!strcmp(a, "--hold-mib"))
			o_hold_blocks = v * (1u << 20) / BS;
		else if (!strcmp(a, "--pool-mib"))
			o_pool_bytes = v << 20;
		else if (!strcmp(a, "--base-gen"))
			o_base_gen = (uint32_t)v;
		else if (!strcmp(a, "--max-seconds"))
			o_max_seconds = (unsigned)v;
		else
			usage();
	}
	ndevs = argc - i;
	if (ndevs < 1 || o_writers < 1 || o_region_blocks < 1 || (o_hold_threads && (!o_base_gen || o_hold_blocks < SLOT_BYTES / BS)))
		usage();
	devs = calloc((size_t)ndevs, sizeof *devs);
	resume_base = calloc((size_t)ndevs * o_writers, sizeof *resume_base);
	uint64_t seed = now_us() | 1;
	unsigned threads = 0;
	for (int k = 0; k < ndevs; k++) {
		struct dev *d = &devs[k];
		d->path = argv[i + k];
		d->name = strrchr(d->path, '/') ? strrchr(d->path, '/') + 1 : d->path;
		d->writers = calloc(o_writers, sizeof *d->writers);
		for (unsigned j = 0; j < o_writers; j++) {
			struct writer *w = &d->writers[j];
			w->d = d;
			w->idx = j;
			w->first = j * o_region_blocks;
			w->n = o_region_blocks;
			w->st = calloc(w->n, sizeof *w->st);
			for (uint64_t b = 0; b < w->n; b++)
				w->st[b].durable = w->st[b].written = o_base_gen;
			w->buf = aligned(MAX_CHUNK);
			w->rng = seed += 0x9e3779b97f4a7c15ull;
			atomic_store(&w->durable_gen, o_base_gen);
			w->gen = o_base_gen;
			w->last_durable = 1;
			pthread_create(&w->th, NULL, writer_main, w);
			threads++;
		}
	}
	struct reader *rs = calloc((size_t)ndevs * o_readers + 1, sizeof *rs);
	struct holder *hs = calloc((size_t)ndevs * o_hold_threads + 1, sizeof *hs);
	for (int k = 0; k < ndevs; k++) {
		for (unsigned j = 0; j < o_readers; j++) {
			struct reader *r = &rs[k * o_readers + j];
			r->d = &devs[k];
			r->rng = seed += 0x9e3779b97f4a7c15ull;
			pthread_create(&r->th, NULL, reader_main, r);
			threads++;
		}
		if (o_hold_threads) {
			uint64_t slots = o_pool_bytes / SLOT_BYTES / o_hold_threads;
			devs[k].pool = aligned(slots * o_hold_threads * SLOT_BYTES);
			for (unsigned j = 0; j < o_hold_threads; j++) {
				struct holder *h = &hs[k * o_hold_threads + j];
				h->d = &devs[k];
				h->idx = j;
				h->nslots = slots;
				h->rng = seed += 0x9e3779b97f4a7c15ull;
				h->slot_block = malloc(slots * sizeof *h->slot_block);
				h->slot_sum = calloc(slots, sizeof *h->slot_sum);
				for (uint64_t s = 0; s < slots; s++)
					h->slot_block[s] = ~0ull;
				pthread_create(&h->th, NULL, holder_main, h);
				threads++;
			}
		}
	}
	pthread_t in;
	pthread_create(&in, NULL, stdin_main, NULL);
	say("GIO-RUNNING devices=%d threads=%u", ndevs, threads);
	uint64_t start = now_us(), last = start;
	while (!atomic_load(&stop_now)) {
		usleep(50000);
		check_resumed();
		check_held();
		if (now_us() - start > (uint64_t)o_max_seconds * 1000000u) {
			say("GIO-NOTE no stop command within %u s: stopping", o_max_seconds);
			atomic_store(&stop_now, 1);
		}
		if (now_us() - last >= 1000000u) {
			last = now_us();
			say("GIO-PROGRESS s=%llu gens=%llu writes=%llu reads=%llu", (unsigned long long)((last - start) / 1000000u),
			    (unsigned long long)atomic_load(&n_gens), (unsigned long long)atomic_load(&n_writes),
			    (unsigned long long)atomic_load(&n_reads));
		}
	}
	say("GIO-STOPPING");
	uint64_t deadline = now_us() + 60000000u;
	unsigned long long hung = 0;
	for (int k = 0; k < ndevs; k++) {
		for (unsigned j = 0; j < o_writers; j++)
			if (join_within(devs[k].writers[j].th, deadline)) {
				hung++;
				say("GIO-HUNG dev=%s writer=%u: not finished 60 s after the stop", devs[k].name, j);
			}
		for (unsigned j = 0; j < o_readers; j++)
			if (join_within(rs[k * o_readers + j].th, deadline)) {
				hung++;
				say("GIO-HUNG dev=%s reader=%u: not finished 60 s after the stop", devs[k].name, j);
			}
		for (unsigned j = 0; j < o_hold_threads; j++)
			if (join_within(hs[k * o_hold_threads + j].th, deadline)) {
				hung++;
				say("GIO-HUNG dev=%s holder=%u: not finished 60 s after the stop", devs[k].name, j);
			}
	}
	for (int k = 0; k < ndevs && !hung; k++) {
		char line[1024];
		size_t at = (size_t)snprintf(line, sizeof line, "GIO-FINAL %s ", devs[k].name);
		for (unsigned j = 0; j < o_writers && at < sizeof line - 24; j++)
			at += (size_t)snprintf(line + at, sizeof line - at, "%s%u%s", j ? "," : "", devs[k].writers[j].gen,
					       devs[k].writers[j].last_durable ? "+" : "");
		say("%s", line);
	}
	unsigned long long errors = atomic_load(&n_errors), vf = atomic_load(&n_verify_fail), hf = atomic_load(&n_hold_fail);
	say("GIO-SUMMARY errors=%llu verify_failures=%llu hold_failures=%llu hung=%llu writes=%llu reads=%llu flushes=%llu "
	    "discards=%llu gens=%llu blocks_verified=%llu held_checks=%llu max_op_ms=%llu",
	    errors, vf, hf, hung, (unsigned long long)atomic_load(&n_writes), (unsigned long long)atomic_load(&n_reads),
	    (unsigned long long)atomic_load(&n_flushes), (unsigned long long)atomic_load(&n_discards),
	    (unsigned long long)atomic_load(&n_gens), (unsigned long long)atomic_load(&n_verified),
	    (unsigned long long)atomic_load(&n_held), (unsigned long long)(atomic_load(&all_max_us) / 1000));
	fflush(stdout);
	_exit(errors || vf || hf || hung ? 1 : 0);
}
