package main

import (
	"bufio"
	"bytes"
	"errors"
	"io"
)

// sseReader parses an SSE byte stream (the WHATWG event-stream format) the
// way EventSource does, but lean: lines are read with ReadSlice straight
// from the bufio buffer, and the event type, data and id are copied into
// three buffers that are reused for every event, so a busy stream
// allocates nothing per line or per event. The buffer is small (4 KiB by
// default) because the idle scenario holds ten thousand of these; a longer
// line spills into one more reusable buffer.
type sseReader struct {
	r       *bufio.Reader
	typ     []byte // "event:" of the event being read
	data    []byte // its "data:" lines, joined by \n
	hasData bool
	id      []byte // the last event ID buffer: persists across events, as in EventSource
	spill   []byte
}

func newSSEReader(r io.Reader, size int) *sseReader {
	return &sseReader{r: bufio.NewReaderSize(r, size)}
}

// reset points the reader at a new connection's body, keeping its buffers;
// the last event ID carries over, as EventSource keeps it across
// reconnections.
func (p *sseReader) reset(r io.Reader) {
	p.r.Reset(r)
	p.typ, p.data, p.hasData = p.typ[:0], p.data[:0], false
}

var (
	fieldEvent = []byte("event")
	fieldData  = []byte("data")
	fieldID    = []byte("id")
)

// next returns the next dispatched event: its type ("message" when none
// was given, as EventSource would say), its data, and the last event ID at
// dispatch, which is what a reconnection must send as Last-Event-ID. An
// event counts as received only once its block has ended (the blank line),
// so a connection cut in the middle of a block neither counts it nor moves
// the resume position. The slices are valid until the next call.
func (p *sseReader) next() (typ, data, id []byte, err error) {
	for {
		line, err := p.line()
		if err != nil {
			return nil, nil, nil, err
		}
		if len(line) == 0 { // end of block: dispatch
			if !p.hasData {
				p.typ = p.typ[:0]
				continue
			}
			typ = p.typ
			if len(typ) == 0 {
				typ = []byte("message")
			}
			data = p.data
			p.typ, p.data, p.hasData = p.typ[:0], p.data[:0], false
			return typ, data, p.id, nil
		}
		if line[0] == ':' { // comment (": ping")
			continue
		}
		field, value := line, []byte(nil)
		if i := bytes.IndexByte(line, ':'); i >= 0 {
			field, value = line[:i], line[i+1:]
			if len(value) > 0 && value[0] == ' ' {
				value = value[1:]
			}
		}
		switch {
		case bytes.Equal(field, fieldData):
			if p.hasData {
				p.data = append(p.data, '\n')
			}
			p.data = append(p.data, value...)
			p.hasData = true
		case bytes.Equal(field, fieldEvent):
			p.typ = append(p.typ[:0], value...)
		case bytes.Equal(field, fieldID):
			if bytes.IndexByte(value, 0) < 0 {
				p.id = append(p.id[:0], value...)
			}
		}
		// retry and unknown fields are ignored.
	}
}

// line returns the next line without its terminator (\n, \r\n or a lone
// \r before \n). A final line without a terminator is dropped: the
// connection ended in the middle of it.
func (p *sseReader) line() ([]byte, error) {
	line, err := p.r.ReadSlice('\n')
	if errors.Is(err, bufio.ErrBufferFull) {
		p.spill = append(p.spill[:0], line...)
		for errors.Is(err, bufio.ErrBufferFull) {
			line, err = p.r.ReadSlice('\n')
			p.spill = append(p.spill, line...)
		}
		line = p.spill
	}
	if err != nil {
		return nil, err
	}
	line = line[:len(line)-1]
	if n := len(line); n > 0 && line[n-1] == '\r' {
		line = line[:n-1]
	}
	return line, nil
}
