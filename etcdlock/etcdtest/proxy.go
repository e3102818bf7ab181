package etcdtest

import (
	"net"
	"strings"
	"sync"
	"testing"
)

// Proxy forwards TCP to one address until it is blocked: then it stops
// forwarding but keeps the connections open, as a network partition does
// (a closed connection would tell the client at once; a partition does
// not). Tests use it to cut a host off from etcd.
type Proxy struct {
	ln     net.Listener
	target string

	mu      sync.Mutex
	cond    *sync.Cond
	blocked bool
	closed  bool
	held    int // bytes read and not forwarded, while blocked
	conns   []net.Conn
}

// NewProxy starts a proxy on a free loopback port to target (host:port, or
// an http:// URL); it is closed when the test ends.
func NewProxy(tb testing.TB, target string) *Proxy {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	p := &Proxy{ln: ln, target: strings.TrimPrefix(target, "http://")}
	p.cond = sync.NewCond(&p.mu)
	go p.serve()
	tb.Cleanup(p.Close)
	return p
}

// URL is the proxy's address as an etcd endpoint.
func (p *Proxy) URL() string { return "http://" + p.ln.Addr().String() }

func (p *Proxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		s, err := net.Dial("tcp", p.target)
		if err != nil {
			c.Close()
			continue
		}
		p.mu.Lock()
		p.conns = append(p.conns, c, s)
		p.mu.Unlock()
		go p.pipe(s, c)
		go p.pipe(c, s)
	}
}

func (p *Proxy) pipe(dst, src net.Conn) {
	defer dst.Close()
	defer src.Close()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			p.mu.Lock()
			p.held += n
			for p.blocked && !p.closed {
				p.cond.Wait()
			}
			p.held -= n
			closed := p.closed
			p.mu.Unlock()
			if closed {
				return
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// SetBlocked stops (true) or resumes (false) forwarding.
func (p *Proxy) SetBlocked(b bool) {
	p.mu.Lock()
	p.blocked = b
	p.cond.Broadcast()
	p.mu.Unlock()
}

// Held returns how many bytes the proxy has read, in either direction,
// and holds back because it is blocked: a request counted here has left
// its client and has not reached the server.
func (p *Proxy) Held() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.held
}

// Close stops the proxy and closes its connections.
func (p *Proxy) Close() {
	p.ln.Close()
	p.mu.Lock()
	p.closed = true
	p.cond.Broadcast()
	conns := p.conns
	p.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
}
