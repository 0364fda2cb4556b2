package exporters

import (
	"context"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// ServerSecurity is how the gRPC API is protected ([agent] tls_* and
// token_file in agent.conf).
type ServerSecurity struct {
	CertFile, KeyFile string // TLS; both or neither
	ClientCAFile      string // mTLS: clients must present a certificate signed by it
	TokenFile         string // bearer token clients must send ("authorization: Bearer ...")
	MaxMessageBytes   int
	KeepaliveTime     time.Duration // ping an idle client this often
	KeepaliveTimeout  time.Duration // and drop it if it does not answer
}

// Protected reports whether the API needs credentials (TLS client
// certificates or a token) or is at least encrypted.
func (s ServerSecurity) Protected() bool { return s.CertFile != "" || s.TokenFile != "" }

// ServerOptions turns the settings into grpc.ServerOptions. Files are read
// once, here: a missing or bad one is an error naming it.
func (s ServerSecurity) ServerOptions() ([]grpc.ServerOption, error) {
	var opts []grpc.ServerOption
	if s.MaxMessageBytes > 0 {
		opts = append(opts, grpc.MaxRecvMsgSize(s.MaxMessageBytes), grpc.MaxSendMsgSize(s.MaxMessageBytes))
	}
	if s.KeepaliveTime > 0 {
		opts = append(opts, grpc.KeepaliveParams(keepalive.ServerParameters{Time: s.KeepaliveTime, Timeout: s.KeepaliveTimeout}),
			// Watchers are long-lived and idle between events: let clients
			// ping as often as every 10 s without being cut off.
			grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}))
	}
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
		a := tokenAuth{token: []byte(token)}
		opts = append(opts, grpc.ChainUnaryInterceptor(a.unary), grpc.ChainStreamInterceptor(a.stream))
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

// tokenAuth checks "authorization: Bearer <token>". grpc.health.v1 stays
// open, so a probe needs no secret.
type tokenAuth struct{ token []byte }

func (a tokenAuth) check(ctx context.Context, method string) error {
	if strings.HasPrefix(method, "/grpc.health.v1.Health/") {
		return nil
	}
	md, _ := metadata.FromIncomingContext(ctx)
	for _, v := range md.Get("authorization") {
		if got, ok := strings.CutPrefix(v, "Bearer "); ok && subtle.ConstantTimeCompare([]byte(got), a.token) == 1 {
			return nil
		}
	}
	return status.Error(codes.Unauthenticated, "missing or wrong bearer token (agent.token_file)")
}

func (a tokenAuth) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	if err := a.check(ctx, info.FullMethod); err != nil {
		return nil, err
	}
	return h(ctx, req)
}

func (a tokenAuth) stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	if err := a.check(ss.Context(), info.FullMethod); err != nil {
		return err
	}
	return h(srv, ss)
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
