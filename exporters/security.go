package exporters

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/keepalive"
)

// ServerSecurity is how the gRPC API is protected ([agent] tls_* and
// token_file in agent.conf) and bounded.
type ServerSecurity struct {
	CertFile, KeyFile string        // TLS; both or neither
	ClientCAFile      string        // mTLS: clients must present a certificate signed by it
	TokenFile         string        // bearer token clients must send ("authorization: Bearer ...")
	MaxMessageBytes   int           // largest response (a snapshot, a profile)
	KeepaliveTime     time.Duration // ping an idle client this often
	KeepaliveTimeout  time.Duration // and drop it if it does not answer
	// Exposed says the listener is reachable beyond loopback. Then
	// GetSnapshot and CaptureProfile need a token or mTLS, whatever
	// agent.allow_non_local says: it lets findings out, not the
	// process's every signal and CPU profile.
	Exposed bool
	Limits  GRPCLimits
	// Conns, when set, is the listener the server runs on: RPCs mark
	// their connection busy so a flood of idle ones never evicts it.
	Conns *ConnLimiter
}

// GRPCLimits bound what one client can make the gRPC server hold before
// (and after) it is authenticated. Zero fields take DefaultGRPCLimits.
type GRPCLimits struct {
	// MaxStreams is the concurrent streams of one connection.
	MaxStreams uint32
	// MaxHeaderBytes is the header list of one request (HTTP/2
	// SETTINGS_MAX_HEADER_LIST_SIZE). It is enforced while the headers
	// are decoded, so a huge value is refused at its length prefix.
	MaxHeaderBytes uint32
	// MaxRequestBytes is the largest request message; requests of most
	// methods are tiny and get less (requestLimit).
	MaxRequestBytes int
	// ConnectionTimeout bounds a new connection's TLS and HTTP/2
	// handshake: a connection that never speaks is closed after it.
	ConnectionTimeout time.Duration
	// MaxIdle closes a connection without streams after this long.
	MaxIdle time.Duration
	// MaxHeavyCalls is the GetSnapshot and CaptureProfile calls in
	// progress at once; more are refused with RESOURCE_EXHAUSTED.
	MaxHeavyCalls int
}

// DefaultGRPCLimits are the limits used for zero fields.
func DefaultGRPCLimits() GRPCLimits {
	return GRPCLimits{
		MaxStreams:        16,
		MaxHeaderBytes:    16 << 10,
		MaxRequestBytes:   16 << 10,
		ConnectionTimeout: 5 * time.Second,
		MaxIdle:           5 * time.Minute,
		MaxHeavyCalls:     4,
	}
}

func (l GRPCLimits) withDefaults() GRPCLimits {
	d := DefaultGRPCLimits()
	if l.MaxStreams == 0 {
		l.MaxStreams = d.MaxStreams
	}
	if l.MaxHeaderBytes == 0 {
		l.MaxHeaderBytes = d.MaxHeaderBytes
	}
	if l.MaxRequestBytes <= 0 {
		l.MaxRequestBytes = d.MaxRequestBytes
	}
	if l.ConnectionTimeout <= 0 {
		l.ConnectionTimeout = d.ConnectionTimeout
	}
	if l.MaxIdle <= 0 {
		l.MaxIdle = d.MaxIdle
	}
	if l.MaxHeavyCalls <= 0 {
		l.MaxHeavyCalls = d.MaxHeavyCalls
	}
	return l
}

// Protected reports whether callers must prove who they are: a client
// certificate (mTLS) or a bearer token. TLS alone encrypts but lets anyone
// in, so it is not protection.
func (s ServerSecurity) Protected() bool { return s.ClientCAFile != "" || s.TokenFile != "" }

// ServerOptions turns the settings into grpc.ServerOptions. Files are read
// once, here: a missing or bad one is an error naming it.
//
// Every bound applies before authentication: the header list is limited
// while it is decoded, the token is checked by the tap handle before a
// stream exists (so before any message is read), and a request is limited
// in size before it is decoded. The interceptors check the token again, a
// second line should a future grpc-go call handlers another way.
func (s ServerSecurity) ServerOptions() ([]grpc.ServerOption, error) {
	lim := s.Limits.withDefaults()
	g := &gate{
		exposed:       s.Exposed,
		authenticated: s.Protected(),
		maxHeavy:      int32(lim.MaxHeavyCalls),
		maxRequest:    lim.MaxRequestBytes,
	}
	base := encoding.GetCodecV2(protoCodecName)
	if base == nil {
		return nil, errors.New("grpc-go registered no proto codec")
	}
	opts := []grpc.ServerOption{
		grpc.MaxRecvMsgSize(lim.MaxRequestBytes),
		grpc.MaxHeaderListSize(lim.MaxHeaderBytes),
		grpc.MaxConcurrentStreams(lim.MaxStreams),
		grpc.ConnectionTimeout(lim.ConnectionTimeout),
		// Fixed 64 KiB windows (the HTTP/2 default) turn off grpc-go's
		// window growth by BDP estimation: requests are tiny, and a
		// client must not earn megabytes of buffer per connection.
		grpc.InitialWindowSize(64 << 10),
		grpc.InitialConnWindowSize(64 << 10),
		grpc.InTapHandle(g.tap),
		grpc.StatsHandler(g),
		grpc.ForceServerCodecV2(limitCodec{base: base, g: g}),
		grpc.ChainUnaryInterceptor(g.unary),
		grpc.ChainStreamInterceptor(g.stream),
	}
	if s.Conns != nil {
		opts = append(opts, grpc.StatsHandler(s.Conns.GRPCStats()))
	}
	if s.MaxMessageBytes > 0 {
		opts = append(opts, grpc.MaxSendMsgSize(s.MaxMessageBytes))
	}
	ka := keepalive.ServerParameters{MaxConnectionIdle: lim.MaxIdle}
	if s.KeepaliveTime > 0 {
		ka.Time, ka.Timeout = s.KeepaliveTime, s.KeepaliveTimeout
	}
	opts = append(opts, grpc.KeepaliveParams(ka),
		// Watchers are long-lived and idle between events: let them ping
		// as often as every 10 s. A connection without a stream has no
		// reason to ping; one that does is told to go away.
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: false}))
	if (s.CertFile == "") != (s.KeyFile == "") {
		return nil, errors.New("agent.tls_cert_file and agent.tls_key_file go together")
	}
	if s.ClientCAFile != "" && s.CertFile == "" {
		return nil, errors.New("agent.tls_client_ca_file (mTLS) needs agent.tls_cert_file and agent.tls_key_file")
	}
	if s.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(s.CertFile, s.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("agent.tls_cert_file/tls_key_file: %w", err)
		}
		cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
		if s.ClientCAFile != "" {
			pool, err := certPool(s.ClientCAFile)
			if err != nil {
				return nil, fmt.Errorf("agent.tls_client_ca_file: %w", err)
			}
			cfg.ClientCAs, cfg.ClientAuth = pool, tls.RequireAndVerifyClientCert
		}
		opts = append(opts, grpc.Creds(credentials.NewTLS(cfg)))
	}
	if s.TokenFile != "" {
		token, err := readToken(s.TokenFile)
		if err != nil {
			return nil, fmt.Errorf("agent.token_file: %w", err)
		}
		g.token = []byte(token)
	}
	return opts, nil
}

func certPool(file string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s holds no PEM certificate", file)
	}
	return pool, nil
}

func readToken(file string) (string, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return "", err
	}
	t := strings.TrimSpace(string(b))
	if len(t) < 16 {
		return "", fmt.Errorf("%s: the token is shorter than 16 characters", file)
	}
	return t, nil
}

// ClientSecurity is what the CLI needs to reach a protected agent.
type ClientSecurity struct {
	CAFile            string // verify the agent's certificate with this CA (enables TLS)
	CertFile, KeyFile string // mTLS client certificate
	ServerName        string // expected name in the agent's certificate
	Token             string
}

// DialOptions turns the settings into grpc.DialOptions.
func (c ClientSecurity) DialOptions() ([]grpc.DialOption, error) {
	var opts []grpc.DialOption
	if c.CAFile == "" {
		if c.CertFile != "" {
			return nil, errors.New("--tls-cert needs --tls-ca")
		}
		opts = append(opts, grpc.WithTransportCredentials(insecureCreds()))
	} else {
		pool, err := certPool(c.CAFile)
		if err != nil {
			return nil, fmt.Errorf("--tls-ca: %w", err)
		}
		cfg := &tls.Config{RootCAs: pool, ServerName: c.ServerName, MinVersion: tls.VersionTLS12}
		if c.CertFile != "" {
			cert, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
			if err != nil {
				return nil, fmt.Errorf("--tls-cert/--tls-key: %w", err)
			}
			cfg.Certificates = []tls.Certificate{cert}
		}
		opts = append(opts, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	}
	if c.Token != "" {
		opts = append(opts, grpc.WithPerRPCCredentials(bearer{c.Token}))
	}
	return opts, nil
}

type bearer struct{ token string }

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + b.token}, nil
}

// RequireTransportSecurity is false so a token also works over loopback
// without TLS (inside the pod); across the network the agent refuses to
// listen without TLS or a token anyway.
func (b bearer) RequireTransportSecurity() bool { return false }

func insecureCreds() credentials.TransportCredentials { return insecure.NewCredentials() }
