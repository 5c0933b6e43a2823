package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/virtual-kubelet/virtual-kubelet/errdefs"
	"github.com/virtual-kubelet/virtual-kubelet/node/api"
)

// Container logs are kept as the kubelet keeps them (the CRI logging format: one line per record,
// "<RFC3339Nano time> <stdout|stderr> <F|P> <text>", P for a partial line), one file per run of a
// container: logs/<container>/<restart count>.log. `kubectl logs` reads the current run,
// `--previous` the run before.

const maxLogLine = 16 * 1024

type logFile struct {
	mu sync.Mutex
	f  *os.File
	wg sync.WaitGroup
}

type logStream struct {
	w *os.File // the process's end of the pipe
}

func newLogFile(path string) (*logFile, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	return &logFile{f: f}, nil
}

// closeWhenDone closes the file once every writer (the process, and whatever inherited its
// output) has closed its end; call it after the last stream.
func (l *logFile) closeWhenDone() {
	go func() {
		l.wg.Wait()
		l.mu.Lock()
		l.f.Close()
		l.mu.Unlock()
	}()
}

// stream is a pipe whose lines are written to the log file tagged with the stream's name.
func (l *logFile) stream(name string) *logStream {
	r, w, err := os.Pipe()
	if err != nil {
		panic(err)
	}
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		defer r.Close()
		reader := bufio.NewReaderSize(r, maxLogLine)
		for {
			line, err := reader.ReadSlice('\n')
			if len(line) > 0 {
				tag := "F"
				if line[len(line)-1] == '\n' {
					line = line[:len(line)-1]
				} else {
					tag = "P"
				}
				l.mu.Lock()
				fmt.Fprintf(l.f, "%s %s %s %s\n", time.Now().UTC().Format(time.RFC3339Nano), name, tag, line)
				l.mu.Unlock()
			}
			if err != nil && err != bufio.ErrBufferFull {
				return
			}
		}
	}()
	return &logStream{w: w}
}

func (s *logStream) closeWriter() { s.w.Close() }

// waitAndClose waits up to timeout for the process's output to drain. Daemons that inherited the
// output may keep it open; their lines still reach the file.
func (l *logFile) waitAndClose(timeout time.Duration) {
	done := make(chan struct{})
	go func() { l.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(timeout):
	}
}

// GetContainerLogs serves `kubectl logs` (tail, since, timestamps, limit-bytes, follow, previous).
func (p *Provider) GetContainerLogs(ctx context.Context, namespace, podName, container string,
	opts api.ContainerLogOpts) (io.ReadCloser, error) {
	r, err := p.lookup(namespace, podName)
	if err != nil {
		return nil, err
	}
	c := r.container(container)
	if c == nil {
		return nil, errdefs.NotFoundf("container %q in pod %q not found", container, podName)
	}
	r.mu.Lock()
	path, exited, n := c.logPath, c.exited, c.restarts
	waiting := c.state.Waiting
	r.mu.Unlock()
	if opts.Previous {
		prev := filepath.Join(c.logDir, fmt.Sprintf("%d.log", n-1))
		if path != "" && path == prev || n == 0 {
			return nil, errdefs.InvalidInputf("previous terminated container %q in pod %q not found", container, podName)
		}
		path = prev
		opts.Follow = false
	}
	if path == "" {
		reason := ""
		if waiting != nil {
			reason = waiting.Reason
		}
		return nil, errdefs.InvalidInputf("container %q in pod %q is waiting to start: %s", container, podName, reason)
	}
	out, in := io.Pipe()
	go func() {
		in.CloseWithError(copyLogs(ctx, path, opts, exited, in))
	}()
	return out, nil
}

func (r *podRun) container(name string) *ctrRun {
	for _, c := range append(append([]*ctrRun{}, r.initCtrs...), r.ctrs...) {
		if c.spec.Name == name {
			return c
		}
	}
	return nil
}

type logRecord struct {
	ts   time.Time
	raw  string // timestamp included
	text string // content, with a newline unless the record is partial
}

func parseRecord(line string) (logRecord, bool) {
	parts := strings.SplitN(line, " ", 4)
	if len(parts) < 4 {
		return logRecord{}, false
	}
	ts, err := time.Parse(time.RFC3339Nano, parts[0])
	if err != nil {
		return logRecord{}, false
	}
	text := parts[3]
	if parts[2] == "F" {
		text += "\n"
	}
	return logRecord{ts: ts, raw: parts[0] + " " + text, text: text}, true
}

func copyLogs(ctx context.Context, path string, opts api.ContainerLogOpts, exited <-chan struct{}, w io.Writer) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	since := opts.SinceTime
	if opts.SinceSeconds > 0 {
		since = time.Now().Add(-time.Duration(opts.SinceSeconds) * time.Second)
	}
	written := 0
	emit := func(rec logRecord) (bool, error) {
		if !since.IsZero() && rec.ts.Before(since) {
			return true, nil
		}
		text := rec.text
		if opts.Timestamps {
			text = rec.raw
		}
		if opts.LimitBytes > 0 && written+len(text) > opts.LimitBytes {
			text = text[:opts.LimitBytes-written]
		}
		n, err := io.WriteString(w, text)
		written += n
		return opts.LimitBytes <= 0 || written < opts.LimitBytes, err
	}
	// What is there now (the last opts.Tail records of it).
	data, err := io.ReadAll(f)
	if err != nil {
		return err
	}
	complete := bytes.LastIndexByte(data, '\n') + 1
	pending := append([]byte{}, data[complete:]...)
	var records []logRecord
	for _, line := range strings.Split(string(data[:complete]), "\n") {
		if rec, ok := parseRecord(line); ok {
			records = append(records, rec)
		}
	}
	if opts.Tail > 0 && len(records) > opts.Tail {
		records = records[len(records)-opts.Tail:]
	}
	for _, rec := range records {
		if more, err := emit(rec); err != nil || !more {
			return err
		}
	}
	if !opts.Follow {
		return nil
	}
	buf := make([]byte, 64*1024)
	for {
		n, err := f.Read(buf)
		if n > 0 {
			pending = append(pending, buf[:n]...)
			for {
				i := bytes.IndexByte(pending, '\n')
				if i < 0 {
					break
				}
				if rec, ok := parseRecord(string(pending[:i])); ok {
					if more, err := emit(rec); err != nil || !more {
						return err
					}
				}
				pending = pending[i+1:]
			}
			continue
		}
		if err != nil && err != io.EOF {
			return err
		}
		select {
		case <-ctx.Done():
			return nil
		case <-exited:
			// One last read for what the process wrote just before it ended.
			select {
			case <-time.After(300 * time.Millisecond):
			case <-ctx.Done():
				return nil
			}
			rest, _ := io.ReadAll(f)
			pending = append(pending, rest...)
			for _, line := range strings.Split(string(pending), "\n") {
				if rec, ok := parseRecord(line); ok {
					if more, err := emit(rec); err != nil || !more {
						return err
					}
				}
			}
			return nil
		case <-time.After(200 * time.Millisecond):
		}
	}
}
