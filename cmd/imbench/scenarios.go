package main

import (
	"context"
	"fmt"
	"sync"
)

// The scenarios of issue 6. Each builds the users, conversations, streams
// and the senders' choice of (user, conversation), and returns how many
// senders to run; the engine does the rest the same way for all of them.

// setupFanout: one group of --members users, all streaming, --senders of
// them posting into it. Every message is delivered members times, so this
// measures the server's fan-out.
func (e *engine) setupFanout(ctx context.Context) (int, error) {
	return e.setupOneGroup(ctx, "imbench fanout")
}

// setupHot: one conversation, many concurrent senders (50 by default): all
// sends contend for the same seq counter. The members also stream, and at
// the end the history must hold seq 1..N without a gap.
func (e *engine) setupHot(ctx context.Context) (int, error) {
	return e.setupOneGroup(ctx, "imbench hot")
}

func (e *engine) setupOneGroup(ctx context.Context, title string) (int, error) {
	us, err := e.users(ctx, e.cfg.members)
	if err != nil {
		return 0, err
	}
	id, err := e.cl.createGroup(ctx, us[0], title, names(us[1:]))
	if err != nil {
		return 0, err
	}
	c := newConv(id, us)
	e.convs = []*conv{c}
	for i, u := range us {
		e.streams = append(e.streams, e.newStream(i, u, c))
	}
	e.pick = func(k int, _ int64) (*user, *conv) { return us[k%len(us)], c }
	return e.cfg.senders, nil
}

// setupDM: --pairs pairs (a, b), each in its own direct conversation; the
// b side streams, the a side sends. Sender k takes the pairs p ≡ k mod
// senders in turn, so every conversation gets traffic and no two senders
// share one.
func (e *engine) setupDM(ctx context.Context) (int, error) {
	p := e.cfg.pairs
	us, err := e.users(ctx, 2*p)
	if err != nil {
		return 0, err
	}
	convs := make([]*conv, p)
	err = parallel(ctx, p, e.cfg.setupConc, func(i int) error {
		a, b := us[2*i], us[2*i+1]
		id, err := e.cl.createDirect(ctx, a, b.name)
		convs[i] = newConv(id, []*user{a, b})
		return err
	})
	if err != nil {
		return 0, err
	}
	e.convs = convs
	for i, c := range convs {
		e.streams = append(e.streams, e.newStream(i, c.members[1], c))
	}
	senders := min(e.cfg.senders, p)
	e.pick = func(k int, n int64) (*user, *conv) {
		mine := int64((p - k + senders - 1) / senders) // pairs k, k+senders, …
		c := convs[k+int((n-1)%mine)*senders]
		return c.members[0], c
	}
	return senders, nil
}

// setupIdle: --streams users with one open stream each and no traffic; the
// server's memory per stream is what is measured.
func (e *engine) setupIdle(ctx context.Context) (int, error) {
	us, err := e.users(ctx, e.cfg.streams)
	if err != nil {
		return 0, err
	}
	for i, u := range us {
		e.streams = append(e.streams, e.newStream(i, u))
	}
	return 0, nil
}

// setupReconnect: --streams users in groups of --members, one stream each;
// messages flow into the groups at --rate while the streams drop in waves
// and resume with Last-Event-ID. Senders spread over the groups and over
// their members, so no one user's send limit is hit first.
func (e *engine) setupReconnect(ctx context.Context) (int, error) {
	s, m := e.cfg.streams, min(e.cfg.members, e.cfg.streams)
	us, err := e.users(ctx, s)
	if err != nil {
		return 0, err
	}
	groups := (s + m - 1) / m
	convs := make([]*conv, groups)
	var mu sync.Mutex
	err = parallel(ctx, groups, e.cfg.setupConc, func(g int) error {
		members := us[g*m : min((g+1)*m, s)]
		id, err := e.cl.createGroup(ctx, members[0], fmt.Sprintf("imbench reconnect %d", g), names(members[1:]))
		mu.Lock()
		convs[g] = newConv(id, members)
		mu.Unlock()
		return err
	})
	if err != nil {
		return 0, err
	}
	e.convs = convs
	for i, u := range us {
		e.streams = append(e.streams, e.newStream(i, u, convs[i/m]))
	}
	senders := e.cfg.senders
	e.pick = func(k int, n int64) (*user, *conv) {
		c := convs[(int64(k)+(n-1)*int64(senders))%int64(groups)]
		return c.members[(n-1)%int64(len(c.members))], c
	}
	return senders, nil
}

func (e *engine) newStream(i int, u *user, convs ...*conv) *stream {
	return newStream(i, u, convs, e.cl, e.cfg.down, e.cfg.readBuf)
}

func names(us []*user) []string {
	out := make([]string, len(us))
	for i, u := range us {
		out[i] = u.name
	}
	return out
}

// checkHistory pages through the conversation's history and counts the
// seqs missing from 1..last, and the acknowledged sends history lacks.
func (e *engine) checkHistory(ctx context.Context, c *conv) (total, gaps int64, err error) {
	var after int64
	reader := c.members[0].token
	for {
		page, more, err := e.cl.history(ctx, reader, c.id, after, 200)
		if err != nil {
			return total, gaps, err
		}
		for _, m := range page {
			if m.Seq > after+1 {
				gaps += m.Seq - after - 1
			}
			if m.Seq > after {
				after = m.Seq
			}
			total++
		}
		if !more || len(page) == 0 {
			break
		}
	}
	// An acknowledged seq beyond the history's end is a gap too.
	if last := c.maxAcc.Load(); last > after {
		gaps += last - after
	}
	return total, gaps, nil
}
